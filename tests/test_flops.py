"""Tests of routerkit.flops and the FlopAccountant, against fvcore's FlopCountAnalysis used directly."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from routerkit import FlopAccountant, PatchGrid, RoutedPipeline, WholeInput, Zoo
from routerkit.data import Split
from routerkit.flops import count_flops
from routerkit.models import CifarResNet, ToyClassifier, ToySegmenter, UNet
from routerkit.replay import build_unit_table, routed_flops
from routerkit.rewards import Correctness
from routerkit.routers import PaSeRRouter, RandomRouter, SingleModelRouter
from routerkit.uncertainty import MCDropoutEntropy

SHAPE = (1, 16, 16)
GRID = PatchGrid(2, 2)
UNIT = (1, 8, 8)
K = 2


def fvcore_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """fvcore total of one eval-mode forward on a single zero input of ``shape``."""
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        analysis = FlopCountAnalysis(model, (torch.zeros(1, *shape),))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())


@pytest.mark.parametrize(("k", "cin", "cout", "h", "w"), [(3, 3, 5, 8, 8), (1, 2, 7, 5, 9), (5, 1, 1, 6, 4)])
def test_conv2d_flops(k: int, cin: int, cout: int, h: int, w: int) -> None:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    assert count_flops(conv, (cin, h, w)) == k * k * cin * cout * h * w


def test_linear_flops_and_mode_restored() -> None:
    lin = nn.Linear(6, 4).train()
    assert count_flops(lin, (6,)) == 24
    assert lin.training
    assert count_flops(nn.ReLU(), (3,)) == 0  # parameterless modules are fine


@pytest.fixture
def zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo(
        [
            UNet(1, K, base_channels=2, depth=1, dropout=0.3),
            ToySegmenter(in_channels=1, num_classes=K, width=8),
            UNet(1, K, base_channels=4, depth=1),
        ]
    ).eval()


def test_accountant_caches_fvcore_counts(zoo: Zoo) -> None:
    acc = FlopAccountant(zoo, GRID, SHAPE)
    assert acc.unit_shape == UNIT
    assert acc.base_flops == fvcore_flops(zoo[0], SHAPE)
    assert acc.unit_flops == [fvcore_flops(m, UNIT) for m in zoo]
    counts = torch.tensor([[4, 0, 0], [1, 2, 1]])
    per_input = acc.per_input(3 * acc.base_flops, 100, counts)
    assert per_input.dtype == torch.float64
    base = 3 * acc.base_flops + 100
    assert per_input.tolist() == [base, base + 2 * acc.unit_flops[1] + acc.unit_flops[2]]


@pytest.mark.parametrize("index", [1, 2])
def test_single_model_router_large(zoo: Zoo, index: int) -> None:
    pipe = RoutedPipeline(zoo, GRID, MCDropoutEntropy(num_passes=5), "param_share", SHAPE)
    router = SingleModelRouter(3, index=index, grid_shape=(2, 2))
    out = pipe(torch.randn(3, *SHAPE), router)
    expected = GRID.num_units * fvcore_flops(zoo[index], UNIT)
    assert out.flops.tolist() == [expected] * 3
    assert bool((out.actions == index).all())


def test_single_model_router_base(zoo: Zoo) -> None:
    pipe = RoutedPipeline(zoo, GRID, MCDropoutEntropy(num_passes=5), "param_share", SHAPE)
    router = SingleModelRouter(3, index=0, grid_shape=(2, 2))
    out = pipe(torch.randn(2, *SHAPE), router)
    # One deterministic pass of f_0 on the whole image; no MC passes, no policy, no units.
    assert out.flops.tolist() == [fvcore_flops(zoo[0], SHAPE)] * 2


@pytest.mark.parametrize("passes", [1, 4])
def test_paser_router_flops(zoo: Zoo, passes: int) -> None:
    torch.manual_seed(1)
    pipe = RoutedPipeline(zoo, GRID, MCDropoutEntropy(num_passes=passes), "param_share", SHAPE)
    router = PaSeRRouter(3, grid_shape=(2, 2), in_channels=K + 1, width=4).eval()
    x = torch.randn(6, *SHAPE)
    out = pipe(x, router, greedy=False, generator=torch.Generator().manual_seed(0))
    assert len(out.actions.unique()) > 1  # a mix of decisions
    base = passes * fvcore_flops(zoo[0], SHAPE)
    policy = fvcore_flops(router.policy, (K + 1, *SHAPE[1:]))
    unit = [fvcore_flops(m, UNIT) for m in zoo]
    assert policy > 0
    for b in range(x.shape[0]):
        routed = sum(unit[a] for a in out.actions[b].tolist() if a > 0)
        assert out.flops[b].item() == base + policy + routed


def test_random_router_flops(zoo: Zoo) -> None:
    pipe = RoutedPipeline(zoo, GRID, MCDropoutEntropy(num_passes=7), "param_share", SHAPE)
    router = RandomRouter(3, grid_shape=(2, 2), seed=3)
    out = pipe(torch.randn(5, *SHAPE), router)
    unit = [fvcore_flops(m, UNIT) for m in zoo]
    # The random router needs f_0 only for the units it sends there: one deterministic pass.
    for b in range(5):
        routed = sum(unit[a] for a in out.actions[b].tolist() if a > 0)
        assert out.flops[b].item() == fvcore_flops(zoo[0], SHAPE) + routed


def test_whole_input_classifier_flops() -> None:
    torch.manual_seed(2)
    zoo = Zoo([ToyClassifier(4, 3, hidden=5, dropout=0.2), ToyClassifier(4, 3, hidden=32)])
    pipe = RoutedPipeline(zoo, WholeInput(), MCDropoutEntropy(num_passes=3), "flops", (4,))
    router = SingleModelRouter(2, index=1, spatial=False)
    out = pipe(torch.randn(2, 4), router)
    assert out.flops.tolist() == [fvcore_flops(zoo[1], (4,))] * 2 == [4 * 32 + 32 * 3] * 2


def test_paser_on_a_shared_trunk_classifier_pays_one_trunk_and_n_heads() -> None:
    torch.manual_seed(3)
    zoo = Zoo([CifarResNet(8, 4, in_channels=1, width=4, dropout=0.3), CifarResNet(8, 4, in_channels=1, width=8)]).eval()
    shape = (1, 16, 16)
    pipe = RoutedPipeline(zoo, WholeInput(), MCDropoutEntropy(num_passes=5), "flops", shape)
    router = PaSeRRouter(2, in_channels=4 + 1, spatial=False, width=4).eval()
    out = pipe(torch.randn(3, *shape), router)
    full = fvcore_flops(zoo[0], shape)
    head = 16 * 4 * 4 + 16 * 4  # fvcore: pooling of the 16 x 4 x 4 maps + the linear layer
    policy = fvcore_flops(router.policy, (4 + 1,))
    for b in range(3):
        routed = fvcore_flops(zoo[1], shape) if int(out.actions[b, 0]) == 1 else 0
        assert out.flops[b].item() == full + 4 * head + policy + routed
    # The replayed table charges the same.
    split = Split(torch.randn(3, *shape), torch.randint(0, 4, (3,)))
    table = build_unit_table(pipe, Correctness(4), split, 4)
    assert table.state_flops == full + 4 * head
    actions = torch.ones(3, 1, dtype=torch.long)
    assert routed_flops(pipe, router, table, actions) == pytest.approx(full + 4 * head + policy + fvcore_flops(zoo[1], shape))


def test_fvcore_import_prints_no_jit_script_warning() -> None:
    """fvcore's import-time torch.jit.script FutureWarning no longer reaches users (fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import torch\n"
        "from routerkit.flops import count_flops\n"
        "count_flops(torch.nn.Conv2d(1, 1, 3), (1, 8, 8))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "jit.script" not in out.stderr, out.stderr
    # The filter is scoped to that import: other FutureWarnings still show.
    code2 = code + "warnings.warn('other', FutureWarning)\n"
    out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=120, check=True)
    assert "other" in out2.stderr
