"""Small contracts of the training stages."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from routerkit.data import Split
from routerkit.models import ToySegmenter, Zoo
from routerkit.partitioners import WholeInput
from routerkit.pipeline import RoutedPipeline
from routerkit.training.pretraining import LargeModelPretraining, _ce
from routerkit.training.schedules import StageSettings, lr_factor


def test_cross_entropy_of_an_all_ignored_batch_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = torch.full((2, 4, 4), 255)
    loss = _ce(logits, targets, 255)
    assert float(loss) == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    targets[0, 0, 0] = 1
    assert torch.isfinite(_ce(logits, targets, 255)) and float(_ce(logits, targets, 255)) > 0


def test_classification_augmentation_flips_and_crops_images_only() -> None:
    from routerkit.training.augment import _augment

    images = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).reshape(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    teacher = torch.randn(4, 10)
    out, out_labels, out_teacher = _augment(images, labels, torch.Generator().manual_seed(0), teacher)
    assert out.shape == images.shape and torch.equal(out_labels, labels) and torch.equal(out_teacher, teacher)
    assert not torch.equal(out, images)
    again = _augment(images, labels, torch.Generator().manual_seed(0), teacher)[0]
    assert torch.equal(again, out)
    # Each output is a shifted (and maybe mirrored) window of its own image, zero-padded by 2 pixels.
    for i in range(4):
        values = set(out[i][out[i] != 0].tolist())
        assert values <= set(images[i].flatten().tolist())


def test_lr_factor_schedules() -> None:
    assert [lr_factor("constant", e, 4) for e in range(4)] == [1.0] * 4
    cosine = [lr_factor("cosine", e, 4) for e in range(4)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5)
    assert all(a > b > 0 for a, b in itertools.pairwise(cosine))
    assert cosine[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert lr_factor("cosine", 0, 1) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("step", 1, 4)


def test_cosine_schedule_sets_every_optimiser_per_epoch() -> None:
    zoo = Zoo([ToySegmenter(1, 2, width=2), ToySegmenter(1, 2, width=4), ToySegmenter(1, 2, width=6)])
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (1, 8, 8))
    data = Split(torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8, 8, 8)))
    stage = LargeModelPretraining(pipe, data, StageSettings(4, 0.01, 4, lr_schedule="cosine"), seed=0)
    seen = []
    for epoch in range(4):
        stage.train_epoch(epoch)
        seen.append([o.param_groups[0]["lr"] for o in stage.optimizers.values()])
    for epoch, rates in enumerate(seen):
        assert rates == pytest.approx([0.01 * lr_factor("cosine", epoch, 4)] * 2)
    with pytest.raises(ValueError, match="lr_schedule"):
        LargeModelPretraining(pipe, data, StageSettings(1, 0.01, 4, lr_schedule="linear"), seed=0)


def test_onecycle_warms_up_then_anneals_to_almost_zero() -> None:
    rates = [lr_factor("onecycle", 4 * s / 100, 4) for s in range(101)]
    assert rates[0] == pytest.approx(1 / 25)
    peak = max(range(101), key=rates.__getitem__)
    assert peak == 15 and rates[peak] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(rates[: peak + 1]))
    assert all(a > b for a, b in itertools.pairwise(rates[peak:]))
    assert rates[-1] == pytest.approx(1 / 25 / 1e4)


def _classifier_stage(settings: StageSettings, seed: int = 0) -> tuple[LargeModelPretraining, RoutedPipeline]:
    from routerkit.models import CifarResNet

    torch.manual_seed(seed)
    zoo = Zoo([CifarResNet(8, 3, width=4, dropout=0.1), CifarResNet(8, 3, width=4), CifarResNet(8, 3, width=8)])
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (3, 16, 16))
    g = torch.Generator().manual_seed(1)
    data = Split(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 3, (24,), generator=g))
    return LargeModelPretraining(pipe, data, settings, seed=seed), pipe


def test_onecycle_sets_the_rate_at_every_step_with_sgd() -> None:
    settings = StageSettings(2, 0.1, 8, 5e-4, "onecycle", optimizer="sgd", momentum=0.9, nesterov=True)
    stage, _ = _classifier_stage(settings)
    opt = stage.optimizers["f1"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    seen: list[float] = []
    original = opt.step

    def record(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(opt.param_groups[0]["lr"])
        return original(*args, **kwargs)

    opt.step = record  # type: ignore[method-assign]
    for epoch in range(2):
        stage.train_epoch(epoch)
    # 3 steps per epoch, 6 in all: the rate of step k is the schedule at k / 3 epochs, not one rate per epoch
    assert seen == pytest.approx([0.1 * lr_factor("onecycle", k / 3, 2) for k in range(6)])
    assert len(set(seen)) == 6


def test_bf16_channels_last_pretraining_learns_and_keeps_float32_weights() -> None:
    settings = StageSettings(6, 0.05, 8, 0.0, "onecycle", optimizer="sgd", precision="bf16", channels_last=True)
    stage, pipe = _classifier_stage(settings)
    conv = pipe.zoo[1].stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training:  # the training forward, not the validation / batch-norm passes
            seen.append((inputs[0].is_contiguous(memory_format=torch.channels_last), output.dtype))

    pipe.zoo[1].stem[0].register_forward_hook(hook)
    losses = [stage.train_epoch(e)["losses/ce_f1"] for e in range(6)]
    assert seen and all(seen_cl and dtype == torch.bfloat16 for seen_cl, dtype in seen)  # channels-last batches, bf16 convs
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in pipe.zoo.parameters())


def test_pretraining_with_sgd_and_onecycle_resumes_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from routerkit.training.checkpoint import load_checkpoint, save_checkpoint

    settings = StageSettings(3, 0.1, 8, 5e-4, "onecycle", optimizer="sgd")
    straight, pipe_a = _classifier_stage(settings)
    for epoch in range(3):
        logs_a = straight.train_epoch(epoch)
    first, _ = _classifier_stage(settings)
    first.train_epoch(0)
    save_checkpoint(tmp_path, "pretrain-e0000", first.state_dict(), {"epoch": 0})
    resumed, pipe_b = _classifier_stage(settings)
    state, _ = load_checkpoint(tmp_path)
    resumed.load_state_dict(state)
    for epoch in (1, 2):
        logs_b = resumed.train_epoch(epoch)
    assert logs_a == pytest.approx(logs_b)
    for p, q in zip(pipe_a.zoo.parameters(), pipe_b.zoo.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unknown_optimizer_or_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        _classifier_stage(StageSettings(1, 0.1, 8, optimizer="lion"))
    with pytest.raises(ValueError, match="precision"):
        _classifier_stage(StageSettings(1, 0.1, 8, precision="fp8"))


@pytest.mark.parametrize("large_on", ["routed", "all"])
def test_bf16_finetune_runs_the_large_models_in_bfloat16_and_keeps_float32_weights(large_on: str) -> None:
    from routerkit import PatchGrid
    from routerkit.models import UNet
    from routerkit.rewards import Correctness, PaSeRReward
    from routerkit.routers import create_router
    from routerkit.training.finetune import JointFineTuning

    torch.manual_seed(0)
    zoo = Zoo([UNet(1, 2, 1, 1, dropout=0.1), UNet(1, 2, 2, 1), UNet(1, 2, 3, 1)])
    pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "softmax_entropy", "param_share", (1, 8, 8))
    images = torch.rand(8, 1, 8, 8)
    data = Split(images, (images[:, 0] > 0.5).long())
    router = create_router("paser", router_spec=pipe.router_spec(2, True), width=4)
    seen: list[torch.dtype] = []
    for i in (1, 2):
        zoo[i].register_forward_hook(lambda m, i, out: seen.append(out.dtype) if m.training else None)
    settings = StageSettings(2, 0.05, 4, precision="bf16")
    stage = JointFineTuning(pipe, router, PaSeRReward(0.1), Correctness(2), data, settings, 0, large_on=large_on)  # type: ignore[arg-type]
    logs = [stage.train_epoch(e) for e in range(2)]
    assert seen and set(seen) == {torch.bfloat16}
    assert all(math.isfinite(v) for row in logs for v in row.values())
    assert all(p.dtype == torch.float32 for p in pipe.zoo.parameters()) and any(k.startswith("losses/ce_") for k in logs[0])
