"""Worker of tests/training/test_distributed.py: run alone (one process) or under torchrun (two ranks).

Trains one BN-free zoo through both pre-training stages (no augmentation, so every draw is the
stage's order), then checks `Distributed.sync_gradients` with uneven unit counts; rank 0 saves the
weights and the synced gradient to ``argv[1]``. ``argv[2] == "lazy"`` reads the data through a
`DatasetSplit` (each rank reads only its shard of every global batch).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset

from routerkit.data import DatasetSplit, Split
from routerkit.models import ToySegmenter, Zoo
from routerkit.partitioners import PatchGrid
from routerkit.pipeline import RoutedPipeline
from routerkit.training.distributed import setup_distributed, teardown_distributed
from routerkit.training.pretraining import BaseModelPretraining, LargeModelPretraining
from routerkit.training.schedules import StageSettings


class Reads(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The split's samples, counting how many this process read."""

    def __init__(self, split: Split) -> None:
        self.split, self.reads = split, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.split.images[i], self.split.targets[i]


def main(out: str, kind: str) -> None:
    dist = setup_distributed("cpu")
    torch.manual_seed(0)
    zoo = Zoo([ToySegmenter(1, 3, width=2), ToySegmenter(1, 3, width=4), ToySegmenter(1, 3, width=6)])
    pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "softmax_entropy", "param_share", (1, 8, 8))
    g = torch.Generator().manual_seed(1)
    eager = Split(torch.rand(11, 1, 8, 8, generator=g), torch.randint(0, 3, (11, 8, 8), generator=g))  # last batch: 3
    reads = Reads(eager)
    data = DatasetSplit(reads) if kind == "lazy" else eager
    large = LargeModelPretraining(pipe, data, StageSettings(2, 0.05, 4), seed=0, augment=False)
    logs = [large.train_epoch(0)]
    read = dist.gather(reads.reads)  # samples each rank read in one epoch (both models)
    logs.append(large.train_epoch(1))
    base = BaseModelPretraining(pipe, data, StageSettings(2, 0.05, 4), seed=0, beta=0.5, augment=False)
    logs += [base.train_epoch(e) for e in range(2)]
    # sync_gradients: rank r has 3 * r units of a model (rank 0 none); the loss is weighted by each rank's share
    model = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(model.weight, 0.5)
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    mine = x[3 * dist.rank * (dist.rank - 1) // 2 : 3 * dist.rank * (dist.rank + 1) // 2] if dist.enabled else x[:3]
    routed = dist.all_sum(mine.shape[0])
    if mine.shape[0]:
        (model(mine).pow(2).mean() * (mine.shape[0] / routed if dist.enabled else 1.0)).backward()
    dist.sync_gradients(model.parameters())
    if dist.is_main:
        torch.save({"zoo": zoo.state_dict(), "logs": logs, "grad": model.weight.grad, "read": read}, out)
    teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
