"""Tests of routerkit.uncertainty: MC-dropout entropy and the single-pass softmax estimators."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from routerkit.models import ToyClassifier, ToySegmenter, UNet
from routerkit.uncertainty import (
    BaseOutput,
    MaxProbability,
    MCDropoutEntropy,
    SoftmaxEntropy,
    SoftmaxMargin,
    UncertaintyEstimator,
    create_estimator,
    list_estimators,
)


def record_dropout(layer: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Forward hook on ``layer`` collecting its inputs and outputs."""
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        inputs.append(args[0].detach().clone())
        outputs.append(out.detach().clone())

    layer.register_forward_hook(hook)
    return inputs, outputs


def count_calls(model: nn.Module) -> list[int]:
    """Forward hook on ``model`` collecting the batch size of each call."""
    sizes: list[int] = []
    model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize("max_batch", [None, 4])
def test_mc_dropout_is_mean_over_passes_segmentation(max_batch: int | None) -> None:
    torch.manual_seed(0)
    n, b = 5, 3
    model = ToySegmenter(in_channels=1, num_classes=3, width=6, dropout=0.5).eval()
    drop_in, drop_out = record_dropout(model.net[2])
    x = torch.randn(b, 1, 4, 5)
    result = MCDropoutEntropy(num_passes=n, max_batch=max_batch)(model, x)
    seen_in, seen_out = torch.cat(drop_in), torch.cat(drop_out)
    assert seen_in.shape[0] == n * b
    features = torch.relu(model.net[0](x)).detach()
    # Reference: pass k applies one dropout mask to the features of the whole batch, then the head;
    # the result is the mean over the N passes of the softmax, its entropy the uncertainty.
    per_pass = []
    for k in range(n):
        assert torch.allclose(seen_in[k * b : (k + 1) * b], features, atol=1e-6)
        with torch.no_grad():
            per_pass.append(torch.softmax(model.net[3](seen_out[k * b : (k + 1) * b]), dim=1))
    expected = torch.stack(per_pass).mean(0)
    assert torch.allclose(result.probs, expected, atol=1e-6)
    h = -(expected * expected.log()).sum(1)
    assert torch.allclose(result.uncertainty, h, atol=1e-5)
    # Dropout was really active: the passes differ.
    assert not all(torch.equal(per_pass[0], p) for p in per_pass[1:])


def test_mc_dropout_is_mean_over_passes_vectors() -> None:
    torch.manual_seed(1)
    n, b = 7, 4
    model = ToyClassifier(in_features=5, num_classes=3, hidden=8, dropout=0.4)
    _, drop_out = record_dropout(model.net[2])
    x = torch.randn(b, 5)
    result = MCDropoutEntropy(num_passes=n)(model, x)
    outs = torch.cat(drop_out).reshape(n, b, -1)
    with torch.no_grad():
        expected = torch.softmax(model.net[3](outs), dim=-1).mean(0)
    assert result.probs.shape == (b, 3) and result.uncertainty.shape == (b,)
    assert torch.allclose(result.probs, expected, atol=1e-6)


def test_mc_dropout_probabilities_and_entropy_are_valid() -> None:
    torch.manual_seed(2)
    model = UNet(1, 3, base_channels=2, depth=1, dropout=0.5)
    result = MCDropoutEntropy(num_passes=6)(model, torch.randn(2, 1, 6, 8))
    assert result.probs.shape == (2, 3, 6, 8) and result.uncertainty.shape == (2, 6, 8)
    assert torch.allclose(result.probs.sum(1), torch.ones(2, 6, 8), atol=1e-5)
    assert bool((result.uncertainty > 0).all())
    assert bool((result.uncertainty <= math.log(3) + 1e-5).all())
    assert torch.equal(result.pred, result.probs.argmax(1))
    assert result.state().shape == (2, 4, 6, 8)


def _bn_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("training", [True, False])
def test_mc_dropout_keeps_batchnorm_stats_and_modes(training: bool) -> None:
    torch.manual_seed(3)
    model = UNet(1, 2, base_channels=2, depth=1, dropout=0.3)
    # Non-trivial running statistics first.
    model.train()
    model(torch.randn(4, 1, 8, 8) * 3 + 1)
    model.train(training)
    stats = _bn_state(model)
    modes = {name: m.training for name, m in model.named_modules()}
    MCDropoutEntropy(num_passes=4)(model, torch.randn(3, 1, 8, 8) * 5)
    after = _bn_state(model)
    assert stats.keys() == after.keys() and len(stats) > 0
    for key in stats:
        assert torch.equal(stats[key], after[key]), key
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training is training


def test_mc_dropout_uses_running_stats_not_batch_stats() -> None:
    # Batch-norm stays in eval mode during the MC passes, so a sample's result does not depend on
    # the other samples of the batch (dropout p ~ 0 makes the passes deterministic here).
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Dropout2d(1e-6), nn.Conv2d(4, 2, 1))
    model.train()
    model(torch.randn(8, 1, 4, 4))
    x = torch.randn(3, 1, 4, 4)
    est = MCDropoutEntropy(num_passes=2)
    together = est(model, x).probs
    alone = torch.cat([est(model, x[i : i + 1]).probs for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


@pytest.mark.parametrize(
    ("n", "b", "max_batch", "expected"), [(5, 3, None, [15]), (5, 3, 4, [4, 4, 4, 3]), (2, 4, 8, [8]), (3, 2, 1, [1] * 6)]
)
def test_mc_dropout_batched_forwards(n: int, b: int, max_batch: int | None, expected: list[int]) -> None:
    model = ToySegmenter(in_channels=1, num_classes=2, width=2, dropout=0.2)
    sizes = count_calls(model)
    MCDropoutEntropy(num_passes=n, max_batch=max_batch)(model, torch.randn(b, 1, 4, 4))
    assert sizes == expected
    assert len(sizes) == math.ceil(n * b / (max_batch or n * b))


def test_mc_dropout_runs_large_batches_in_blocks_of_images() -> None:
    model = ToySegmenter(in_channels=1, num_classes=3, width=4, dropout=0.3).eval()
    x = torch.randn(5, 1, 4, 4)
    estimator = MCDropoutEntropy(num_passes=3)
    estimator.block_elements = 3 * 2 * 16  # 3 passes of 2 images of 16 elements per block
    sizes = count_calls(model)
    torch.manual_seed(0)
    blocked = estimator(model, x)
    assert sizes == [6, 6, 3]  # all passes of a block in one forward
    # The same as each block on its own, in order, from the same random stream.
    torch.manual_seed(0)
    alone = [MCDropoutEntropy(num_passes=3)(model, x[i : i + 2]) for i in range(0, 5, 2)]
    assert torch.allclose(blocked.probs, torch.cat([a.probs for a in alone]), atol=1e-6)
    assert torch.allclose(blocked.uncertainty, torch.cat([a.uncertainty for a in alone]), atol=1e-6)


def test_mc_dropout_blocks_follow_what_the_passes_run_on() -> None:
    net = UNet(1, 3, base_channels=2, depth=1, dropout=0.2, dropout_at="head").eval()
    x = torch.randn(5, 1, 6, 8)
    shared, full = MCDropoutEntropy(num_passes=4), MCDropoutEntropy(num_passes=4, share_trunk=False)
    shared.block_elements = full.block_elements = 4 * 2 * 48  # 2 inputs of 1 x 6 x 8, or 1 of their 2-channel features
    heads, passes = count_calls(net.head), count_calls(net)
    shared(net, x)
    assert heads == [4] * 5 and passes == []
    heads.clear()
    full(net, x)
    assert passes == [8, 8, 4] and heads == [8, 8, 4]


def test_mc_dropout_keeps_channels_last_features() -> None:
    net = UNet(1, 3, base_channels=4, depth=1, dropout=0.2, dropout_at="head").eval().to(memory_format=torch.channels_last)
    seen = record_dropout(net.head_dropout)[0]
    MCDropoutEntropy(num_passes=3)(net, torch.randn(2, 1, 8, 8))
    assert seen[0].shape[0] == 6 and seen[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("model", [ToySegmenter(dropout=0.0), nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout(0.0))])
def test_mc_dropout_without_dropout_raises(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="dropout"):
        MCDropoutEntropy(num_passes=3)(model, torch.randn(1, 1, 4, 4))


def test_mc_dropout_argument_checks() -> None:
    with pytest.raises(ValueError, match="num_passes"):
        MCDropoutEntropy(num_passes=0)
    with pytest.raises(ValueError, match="max_batch"):
        MCDropoutEntropy(max_batch=0)
    assert MCDropoutEntropy(num_passes=5, max_batch=2).config() == {"num_passes": 5, "max_batch": 2, "share_trunk": True}
    assert MCDropoutEntropy(num_passes=5).num_passes == 5


def test_mc_dropout_restores_modes_when_model_raises() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    model = Broken().eval()
    with pytest.raises(RuntimeError, match="boom"):
        MCDropoutEntropy(num_passes=2)(model, torch.randn(1, 3))
    assert not model.training and not model.drop.training


def test_mc_dropout_restores_per_module_modes() -> None:
    model = UNet(1, 2, base_channels=2, depth=1, dropout=0.3).train()
    frozen = model.inc[1]
    frozen.eval()
    MCDropoutEntropy(num_passes=2)(model, torch.randn(1, 1, 4, 4))
    assert not frozen.training


def _fixed_logits_model(logits: Tensor) -> nn.Module:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logits = nn.Parameter(logits.clone())

        def forward(self, x: Tensor) -> Tensor:
            return self.logits.expand(x.shape[0], *self.logits.shape[1:]) + 0 * x.sum()

    return Fixed()


def test_softmax_entropy_is_analytic_entropy() -> None:
    torch.manual_seed(5)
    model = ToySegmenter(in_channels=1, num_classes=4, width=3, dropout=0.5).train()
    x = torch.randn(2, 1, 5, 5)
    out = SoftmaxEntropy()(model, x)
    assert model.training and model.net[2].training  # mode restored
    model.eval()  # the estimator runs one deterministic pass: dropout off
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1)
    expected = -(p * p.log()).sum(1)
    assert torch.allclose(out.probs.double(), p, atol=1e-6)
    assert torch.allclose(out.uncertainty.double(), expected, atol=1e-5)


def test_single_pass_estimators_hand_values() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    model = _fixed_logits_model(probs.log())  # one row of logits per sample
    x = torch.zeros(2, 1)
    ent = SoftmaxEntropy()(model, x)
    h0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert ent.uncertainty.tolist() == pytest.approx([h0, math.log(3)], abs=1e-5)
    assert MaxProbability()(model, x).uncertainty.tolist() == pytest.approx([0.3, 2 / 3], abs=1e-5)
    assert SoftmaxMargin()(model, x).uncertainty.tolist() == pytest.approx([1 - 0.5, 1.0], abs=1e-5)


@pytest.mark.parametrize("estimator", [MaxProbability(), SoftmaxMargin(), SoftmaxEntropy()])
def test_single_pass_uncertainties_in_range(estimator: UncertaintyEstimator) -> None:
    torch.manual_seed(6)
    model = ToySegmenter(in_channels=1, num_classes=3, width=4)
    x = torch.randn(3, 1, 6, 6) * 10
    out = estimator(model, x)
    assert out.uncertainty.shape == (3, 6, 6)
    upper = math.log(3) if isinstance(estimator, SoftmaxEntropy) else 1.0
    assert bool((out.uncertainty >= -1e-6).all()) and bool((out.uncertainty <= upper + 1e-6).all())
    assert torch.allclose(out.probs.sum(1), torch.ones(3, 6, 6), atol=1e-5)
    assert estimator.num_passes == 1


def test_estimator_registry_and_output_check() -> None:
    assert {"mc_dropout", "softmax_entropy", "max_prob", "margin"} <= set(list_estimators())
    est = create_estimator("mc_dropout", num_passes=3)
    assert isinstance(est, MCDropoutEntropy) and est.num_passes == 3
    assert isinstance(create_estimator(SoftmaxMargin), SoftmaxMargin)

    class Bad(UncertaintyEstimator):
        def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput:
            return BaseOutput(torch.zeros(x.shape[0], 2, 3), torch.zeros(x.shape[0], 4))

    with pytest.raises(RuntimeError, match="Bad returned probs"):
        Bad()(ToySegmenter(), torch.zeros(2, 1, 3, 3))


def test_estimators_do_not_track_gradients() -> None:
    model = ToySegmenter(in_channels=1, num_classes=2, width=2, dropout=0.2)
    for est in (MCDropoutEntropy(num_passes=2), SoftmaxEntropy()):
        out = est(model, torch.randn(1, 1, 3, 3, requires_grad=True))
        assert not out.probs.requires_grad and not out.uncertainty.requires_grad


class _SplitNet(nn.Module):
    """timm-style split with the dropout in the head (``trunk_dropout`` puts one in the trunk too)."""

    def __init__(self, trunk_dropout: float = 0.0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout(trunk_dropout), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 6 * 6, 3))
        self.trunk_calls: list[int] = []

    def forward_features(self, x: Tensor) -> Tensor:
        self.trunk_calls.append(x.shape[0])
        out: Tensor = self.trunk(x)
        return out

    def forward_head(self, features: Tensor) -> Tensor:
        out: Tensor = self.head(features)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def test_mc_dropout_shared_trunk_same_samples_one_trunk_pass() -> None:
    torch.manual_seed(0)
    net, x = _SplitNet().eval(), torch.randn(4, 1, 6, 6)
    torch.manual_seed(1)
    shared = MCDropoutEntropy(num_passes=6)(net, x)
    # A one-off probe on one input (no random draws), then the trunk once on the batch, not on 6 x 4 inputs.
    assert net.trunk_calls == [1, 4]
    net.trunk_calls.clear()
    torch.manual_seed(1)
    again = MCDropoutEntropy(num_passes=6)(net, x)
    assert net.trunk_calls == [4] and torch.equal(again.probs, shared.probs)  # the probe's answer is cached
    net.trunk_calls.clear()
    torch.manual_seed(1)
    full = MCDropoutEntropy(num_passes=6, share_trunk=False)(net, x)
    assert net.trunk_calls == [24]
    # The head's dropout draws masks of the same shape in the same order: identical samples.
    assert torch.allclose(shared.probs, full.probs, atol=1e-6)
    assert torch.allclose(shared.uncertainty, full.uncertainty, atol=1e-6)
    assert not net.training and not any(m.training for m in net.modules())


def test_mc_dropout_trunk_with_dropout_runs_full_passes() -> None:
    net, x = _SplitNet(trunk_dropout=0.3).eval(), torch.randn(2, 1, 6, 6)
    state = torch.get_rng_state()
    MCDropoutEntropy(num_passes=5)(net, x)
    assert net.trunk_calls == [1, 10]  # the probe saw dropout in the trunk, then 5 full passes ran
    # The probe drew no random numbers: the full passes are those of a model without the split.
    torch.set_rng_state(state)
    plain = MCDropoutEntropy(num_passes=5, share_trunk=False)(net, x)
    torch.set_rng_state(state)
    assert torch.equal(MCDropoutEntropy(num_passes=5)(net, x).probs, plain.probs)


def test_mc_dropout_flops_charge_one_trunk_and_n_heads() -> None:
    from routerkit.flops import count_flops
    from routerkit.models import CifarResNet

    net = CifarResNet(depth=8, num_classes=10, dropout=0.2)
    full = count_flops(net, (3, 32, 32))
    head = 64 * 8 * 8 + 64 * 10  # fvcore: average pooling of the 64 x 8 x 8 maps + the linear layer
    shared = MCDropoutEntropy(num_passes=8).flops(net, (3, 32, 32))
    assert shared == full + 7 * head
    assert MCDropoutEntropy(num_passes=8, share_trunk=False).flops(net, (3, 32, 32)) == 8 * full
    leaky = _SplitNet(trunk_dropout=0.3)
    assert MCDropoutEntropy(num_passes=4).flops(leaky, (1, 6, 6)) == 4 * count_flops(leaky, (1, 6, 6))
    x = torch.randn(3, 3, 32, 32)
    net.eval()
    assert torch.allclose(net.forward_head(net.forward_features(x)), net(x))


class _Features(nn.Module):
    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net.forward_features(x)
        return out


@pytest.mark.parametrize("dropout_at", ["both", "head"])
def test_unet_split_and_head_only_dropout(dropout_at: str) -> None:
    from routerkit.flops import count_flops

    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=4, depth=2, dropout=0.2, dropout_at=dropout_at).eval()
    x = torch.randn(3, 1, 14, 16)  # not a multiple of 4: padded inside, cropped back
    assert torch.allclose(net.forward_head(net.forward_features(x)), net(x), atol=1e-6)
    torch.manual_seed(2)
    shared = MCDropoutEntropy(num_passes=4)(net, x)
    torch.manual_seed(2)
    full = MCDropoutEntropy(num_passes=4, share_trunk=False)(net, x)
    assert torch.allclose(shared.probs, full.probs, atol=1e-5)  # same masks, same samples
    flops = MCDropoutEntropy(num_passes=4).flops(net, (1, 14, 16))
    if dropout_at == "both":  # dropout in the bottleneck: every pass is a full forward
        assert flops == 4 * count_flops(net, (1, 14, 16))
    else:  # one encoder-decoder pass + 4 passes of the 1 x 1 classifier on the 4 x 14 x 16 features
        trunk = count_flops(_Features(net), (1, 14, 16))
        head = count_flops(net.head, (4, 14, 16))
        assert head == 4 * 3 * 14 * 16
        assert flops == trunk + 4 * head < 2 * count_flops(net, (1, 14, 16))
    with pytest.raises(ValueError, match="dropout_at"):
        UNet(dropout_at="decoder")
