"""Tests of routerkit.inference and RoutedPipeline.for_inference: same outputs, originals untouched, FLOPs of what runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import routerkit.inference as inference
from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
from routerkit.flops import count_flops
from routerkit.inference import check_compile, fold_batch_norm, prepare_for_inference
from routerkit.models import CifarResNet, UNet
from routerkit.uncertainty import BaseOutput, MCDropoutEntropy


def _with_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``model`` in eval mode with non-trivial batch-norm statistics and affine maps (a few training-mode forwards)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.5
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *shape, generator=gen) * 2 + 0.5)
    return model.eval()


def _count(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("width", "depth", "size"),
    [(1, 0, (9, 7)), (2, 1, (13, 17)), (3, 3, (28, 32)), (5, 2, (31, 29)), (8, 3, (15, 33))],
)
def test_folded_unet_equals_the_original_in_eval_mode(width: int, depth: int, size: tuple[int, int]) -> None:
    torch.manual_seed(width)
    net = _with_statistics(UNet(1, 3, width, depth, dropout=0.1), (1, *size))
    folded = fold_batch_norm(net)
    x = torch.rand(3, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=0)
    assert _count(net, nn.BatchNorm2d) == 4 * depth + 2 and _count(folded, nn.BatchNorm2d) == 0
    assert _count(folded, nn.Conv2d) == _count(net, nn.Conv2d)


def test_folding_leaves_the_original_unchanged() -> None:
    net = _with_statistics(UNet(1, 3, 4, 2, dropout=0.1), (1, 16, 16))
    net.train()  # a model in training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    prepared = prepare_for_inference(net, channels_last=True)
    assert set(net.state_dict()) == set(before)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert [m.training for m in net.modules()] == modes and _count(net, nn.BatchNorm2d) == 10
    assert not prepared.training
    assert not {p.data_ptr() for p in prepared.parameters()} & {p.data_ptr() for p in net.parameters()}
    assert net.inc[0].weight.is_contiguous()  # the original's layout too


def test_dropout_layers_survive_folding_and_mc_dropout_samples_the_same() -> None:
    net = _with_statistics(UNet(1, 3, 2, 3, dropout=0.2), (1, 28, 32))
    folded = fold_batch_norm(net)
    assert _count(folded, nn.Dropout2d) == _count(net, nn.Dropout2d) == 2
    assert [m.p for m in folded.modules() if isinstance(m, nn.Dropout2d)] == [0.2, 0.2]
    x = torch.rand(2, 1, 28, 32)
    estimator = MCDropoutEntropy(num_passes=4, share_trunk=False)
    torch.manual_seed(3)
    original = estimator(net, x)
    torch.manual_seed(3)
    again = estimator(folded, x)  # the same masks: folding draws no random number
    torch.testing.assert_close(again.probs, original.probs, atol=1e-5, rtol=0)
    assert float(original.uncertainty.std()) > 0


def test_the_cifar_resnet_folds_attributes_called_in_a_custom_forward() -> None:
    net = _with_statistics(CifarResNet(depth=8, width=4, dropout=0.1), (3, 16, 16))
    folded = fold_batch_norm(net)
    assert _count(net, nn.BatchNorm2d) == 9 and _count(folded, nn.BatchNorm2d) == 0
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_a_router_prepared_for_inference_decides_the_same() -> None:
    router = create_router("paser", num_actions=3, grid_shape=(4, 4), in_channels=4, width=6)
    _with_statistics(router.policy, (4, 16, 16))
    fast = prepare_for_inference(router, channels_last=True)
    assert type(fast) is type(router) and _count(router, nn.BatchNorm2d) > 0 and _count(fast, nn.BatchNorm2d) == 0
    probs = torch.softmax(torch.randn(3, 3, 16, 16), 1)
    state = BaseOutput(probs, -(probs * probs.log()).sum(1))
    with torch.no_grad():
        torch.testing.assert_close(fast.logits(state), router.logits(state), atol=1e-5, rtol=0)
    assert torch.equal(fast.route(state), router.route(state))


class _ReadTwice(nn.Module):
    """The convolution's output feeds the norm and the residual: folding would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out: torch.Tensor = self.bn(y) + y
        return out


class _Branchy(nn.Module):
    """Shape-dependent control flow: torch.fx cannot trace it, so nothing in it is folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x)) if x.shape[-1] > 2 else x
        return out


def test_unsafe_pairs_are_left_alone() -> None:
    shared = nn.Conv2d(2, 2, 1)
    nets = [
        _ReadTwice(),
        _Branchy(),
        nn.Sequential(shared, nn.BatchNorm2d(2), shared),  # a convolution used twice
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)),  # not adjacent
        nn.Sequential(nn.ConvTranspose2d(2, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)),  # grouped transposed
    ]
    x = torch.rand(2, 2, 6, 6)
    for net in nets:
        _with_statistics(net, (2, 6, 6))
        folded = fold_batch_norm(net)
        assert _count(folded, nn.BatchNorm2d) == _count(net, nn.BatchNorm2d) == 1, net
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x))


def test_transposed_convolutions_and_biases_fold() -> None:
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 3, 2, stride=2), nn.BatchNorm2d(3)
    )
    _with_statistics(net, (2, 5, 7))
    folded = fold_batch_norm(net)
    assert _count(folded, nn.BatchNorm2d) == 0
    x = torch.rand(2, 2, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_norms_in_training_mode_are_kept_with_a_warning() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    with pytest.warns(UserWarning, match=r"kept 1 batch-norm layer\(s\) in training mode .* call \.eval\(\)"):
        folded = fold_batch_norm(net)
    assert isinstance(folded[1], nn.BatchNorm2d) and folded.training


def test_channels_last_gives_the_same_outputs() -> None:
    net = _with_statistics(UNet(1, 3, 4, 3, dropout=0.1), (1, 28, 32))
    fast = prepare_for_inference(net, channels_last=True)
    assert fast.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 1, 28, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=0)
        assert fast.inc(x).is_contiguous(memory_format=torch.channels_last)  # activations follow the weights


def _battery_like_pipeline(dropout_at: str = "both") -> RoutedPipeline:
    torch.manual_seed(0)
    zoo = Zoo(
        {
            "f0": _with_statistics(UNet(1, 3, 2, 2, dropout=0.2, dropout_at=dropout_at), (1, 32, 32)),
            "f1": _with_statistics(UNet(1, 3, 4, 2), (1, 16, 16)),
            "f2": _with_statistics(UNet(1, 3, 8, 2), (1, 16, 16)),
        }
    )
    return RoutedPipeline(zoo, PatchGrid(2, 2), MCDropoutEntropy(num_passes=4), "flops", (1, 32, 32))


@pytest.mark.parametrize(("dropout_at", "channels_last"), [("both", False), ("head", False), ("head", True)])
def test_an_inference_pipeline_routes_like_the_original(dropout_at: str, channels_last: bool) -> None:
    pipe = _battery_like_pipeline(dropout_at)
    router = create_router("paser", num_actions=3, grid_shape=(2, 2), in_channels=4, width=4).eval()
    fast = pipe.for_inference(channels_last=channels_last)
    assert fast.zoo is not pipe.zoo and fast.inference_mode and not pipe.inference_mode
    x = torch.rand(6, 1, 32, 32)
    torch.manual_seed(5)
    want = pipe(x, router)
    torch.manual_seed(5)
    got = fast(x, router)
    assert torch.equal(got.actions, want.actions) and bool((want.actions > 0).any())
    torch.testing.assert_close(got.base.probs, want.base.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=0)
    assert torch.equal(got.pred, want.pred)
    assert got.probs.is_inference() and not want.probs.is_inference()
    # The FLOPs charged are the folded models': fewer (no batch-norm passes), and exactly what fvcore counts on them.
    assert bool((got.flops < want.flops).all())
    assert fast.accountant.unit_flops == [count_flops(m, (1, 16, 16)) for m in fast.zoo]
    assert fast.accountant.unit_flops == [count_flops(fold_batch_norm(m), (1, 16, 16)) for m in pipe.zoo]
    # The original pipeline and its models are untouched.
    assert all(_count(m, nn.BatchNorm2d) > 0 for m in pipe.zoo) and all(_count(m, nn.BatchNorm2d) == 0 for m in fast.zoo)
    assert fast.estimator is not pipe.estimator


def test_the_shared_trunk_is_charged_and_used_on_folded_models() -> None:
    pipe = _battery_like_pipeline("head")
    fast = pipe.for_inference()
    base = fast.zoo.base
    full, head = count_flops(base, (1, 32, 32)), count_flops(base.head, (2, 32, 32))
    assert fast.base_flops(None) == full - head + 4 * head < pipe.base_flops(None)


def test_compile_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    inference._compile_problem.cache_clear()
    monkeypatch.setattr(torch, "compile", broken)
    pipe = _battery_like_pipeline()
    try:
        with pytest.raises(RuntimeError, match=r"torch.compile \(backend 'inductor'\) does not work here: .*No working C\+\+"):
            check_compile()
        with pytest.raises(RuntimeError, match=r"compile=False"):
            pipe.for_inference(compile=True)
    finally:
        inference._compile_problem.cache_clear()


@pytest.mark.slow
def test_a_compiled_inference_pipeline_routes_like_the_original() -> None:
    pipe = _battery_like_pipeline("head")
    router = create_router("paser", num_actions=3, grid_shape=(2, 2), in_channels=4, width=4).eval()
    fast = pipe.for_inference(channels_last=True, compile=True)
    x = torch.rand(2, 1, 32, 32)
    torch.manual_seed(5)
    want = pipe(x, router)
    torch.manual_seed(5)
    got = fast(x, router)
    assert torch.equal(got.actions, want.actions)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.flops, pipe.for_inference()(x, router).flops)
