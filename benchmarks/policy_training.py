"""Policy training speed: replayed task-model outputs vs recomputing them every epoch.

PaSeR's policy stage needs, for every sampled action, the accuracy of the chosen model on the
unit. routerkit runs the frozen zoo once (`replay_cache`) and every epoch only runs the policy.
This script times one policy epoch on the battery example's zoo (random weights: timing does not
depend on them) both ways, best of ``--repeats``:

- replayed: `PolicyTraining.run_epoch` with the cache built beforehand (build time reported apart);
- recomputed: the same epoch where every batch reruns f_0's MC-dropout passes and every model on
  every unit to score the sampled actions (what an implementation without replay does).

Target: replay at least 20x faster per epoch.

Usage:
    python benchmarks/policy_training.py [--images 64] [--batch 16] [--passes 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from routerkit import PatchGrid, RoutedPipeline, Zoo
from routerkit.data import Split
from routerkit.functional import explore_exploit_sample
from routerkit.models import UNet
from routerkit.rewards import PaSeRReward, UnitIoU
from routerkit.routers import PaSeRRouter
from routerkit.training.policy import PolicyTraining
from routerkit.training.schedules import StageSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = 112, 128
    zoo = Zoo([UNet(1, 3, 2, 3, dropout=0.1), UNet(1, 3, 8, 3), UNet(1, 3, 24, 3)]).eval()
    pipe = RoutedPipeline(zoo, PatchGrid(4, 4), "mc_dropout", "flops", (1, h, w))
    pipe.estimator.num_passes = args.passes  # type: ignore[attr-defined]
    data = Split(torch.rand(args.images, 1, h, w), torch.randint(0, 3, (args.images, h, w)))
    router = PaSeRRouter(3, (4, 4), in_channels=4)
    reward, accuracy = PaSeRReward(0.45), UnitIoU(3)
    stage = PolicyTraining(pipe, router, reward, accuracy, data, StageSettings(10, 1e-3, args.batch), 0)

    t0 = time.perf_counter()
    stage.build_cache()
    t_cache = time.perf_counter() - t0
    replayed = []
    for epoch in range(args.repeats):
        t0 = time.perf_counter()
        stage.run_epoch(epoch)
        replayed.append(time.perf_counter() - t0)

    opt = torch.optim.Adam(router.parameters(), 1e-3)
    part = pipe.partitioner
    costs = pipe.costs
    gen = torch.Generator().manual_seed(0)

    def recomputed_epoch() -> None:
        for images, targets in data.batches(args.batch, shuffle=True, generator=gen):
            with torch.no_grad():
                base = pipe.estimator(zoo.base, images)
                units, unit_targets = part.split(images), part.split(targets)
                acc = [accuracy(part.split(base.probs), unit_targets)]
                for i in (1, 2):
                    acc.append(accuracy(torch.softmax(zoo[i](units), 1), unit_targets))
                table = torch.stack(acc, -1).reshape(images.shape[0], 16, 3)
            logits = router.logits(base)
            actions = explore_exploit_sample(logits, 0.8, gen)
            rewards = reward(table, table[..., :1].expand_as(table), costs.expand_as(table)).gather(-1, actions.unsqueeze(-1))
            logp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1))
            loss = -(logp * (rewards - rewards.mean())).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    recomputed = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        recomputed_epoch()
        recomputed.append(time.perf_counter() - t0)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} "
        f"| threads {torch.get_num_threads()}"
    )
    print(f"D_RL: {args.images} images 1x{h}x{w}, 4x4 patches, batch {args.batch}, {args.passes} MC passes, 3 models\n")
    r, c = min(replayed), min(recomputed)
    print("| policy epoch | seconds | ratio |")
    print("|---|---|---|")
    print(f"| replayed outputs (cache built once in {t_cache:.2f} s) | {r:.3f} | {c / r:.1f}x faster |")
    print(f"| recomputing f_0 MC passes and every model each batch | {c:.3f} | 1.0 |")


if __name__ == "__main__":
    main()
