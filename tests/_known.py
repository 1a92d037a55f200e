"""Shared toy with a known answer: f_0 right on half the inputs, f_1 on the other half, f_2 everywhere."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routerkit import RoutedPipeline, WholeInput, Zoo
from routerkit.data import Split
from routerkit.replay import UnitTable, build_unit_table
from routerkit.rewards import Correctness
from routerkit.routers import PaSeRRouter

K = 3


class KnownModel(nn.Module):
    """Classifier confidently right on inputs of ``good`` groups, elsewhere wrong and nearly uniform (high entropy).

    Inputs are ``[B, 4]``: ``x[:, 0]`` the label, ``x[:, 1]`` the group (0 or 1), the rest noise.
    ``width`` sets its parameter count (its cost) through a hidden layer that runs but does not
    change the output.
    """

    def __init__(self, good: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.good = good
        self.hidden = nn.Linear(4, width)

    def forward(self, x: Tensor) -> Tensor:
        label = x[:, 0].round().long().clamp(0, K - 1)
        group = x[:, 1].round().long()
        good = torch.zeros_like(label, dtype=torch.bool)
        for g in self.good:
            good |= group == g
        confident = 8.0 * nn.functional.one_hot(label, K).float()
        unsure = 0.3 * nn.functional.one_hot((label + 1) % K, K).float()
        logits = torch.where(good.unsqueeze(1), confident, unsure)
        return logits + 0.0 * self.hidden(x).sum(1, keepdim=True)


def known_split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, K, (n,), generator=gen)
    group = torch.arange(n) % 2
    x = torch.cat([label.float().unsqueeze(1), group.float().unsqueeze(1), torch.randn(n, 2, generator=gen)], 1)
    return Split(x, label)


def known_setup(f1_width: int = 16, n: int = 60) -> tuple[RoutedPipeline, Split, UnitTable, PaSeRRouter]:
    """The known zoo (f_0 right on group 0, f_1 on group 1, f_2 everywhere), its replayed table and a fresh policy."""
    zoo = Zoo([KnownModel((0,), 2), KnownModel((1,), f1_width), KnownModel((0, 1), 256)]).eval()
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (4,))
    split = known_split(n, 0)
    table = build_unit_table(pipe, Correctness(K), split, K)
    torch.manual_seed(0)
    return pipe, split, table, PaSeRRouter(3, in_channels=K + 1, spatial=False, width=8)
