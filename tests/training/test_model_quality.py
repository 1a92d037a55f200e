"""Pre-training hygiene: exact batch-norm statistics, per-epoch validation, best epoch, warnings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from routerkit.data import Split
from routerkit.models import UNet, Zoo
from routerkit.partitioners import PatchGrid
from routerkit.pipeline import RoutedPipeline
from routerkit.training.model_quality import model_quality, recompute_bn_statistics
from routerkit.training.pretraining import BaseModelPretraining, LargeModelPretraining, PretrainChecks
from routerkit.training.schedules import StageSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from battery_plugin.synthetic import generate_battery

#: The two-tier scans these checks were written on (the example's defaults have moved on since).
TWO_TIERS = {
    "coarse_scale": 6.0, "fine_scale": 3.5, "region_scale": 14.0, "fine_share": 0.4, "medium_share": 0.0,
    "texture": (0.02, 0.02, 0.04), "fibres": 0.2, "fibre_wavelength": 5.0, "psf_sigma": 0.7, "downsample": 2, "noise": 0.05,
}  # fmt: skip


def _narrow(n: int, seed: int) -> Split:
    """Battery scans squeezed into a narrow band of the range, as a 16-bit tomogram read into [0, 1]."""
    x, y, _ = generate_battery(n, 56, 64, seed=seed, **TWO_TIERS)  # type: ignore[arg-type]
    return Split(0.3 + 0.02 * x, y)


def _pipeline(f0_dropout: float = 0.1) -> RoutedPipeline:
    zoo = Zoo(
        {
            "f0": UNet(1, 3, base_channels=2, depth=2, dropout=f0_dropout),
            "f1": UNet(1, 3, base_channels=8, depth=2),
        }
    )
    return RoutedPipeline(zoo, PatchGrid(2, 2), "softmax_entropy", "param_share", (1, 56, 64))


def _train_briefly(model: torch.nn.Module, data: Split, part: PatchGrid, steps: int = 8) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, y = data.images[step % 4 * 8 : step % 4 * 8 + 8], data.targets[step % 4 * 8 : step % 4 * 8 + 8]
        loss = torch.nn.functional.cross_entropy(model(part.split(x)), part.split(y))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_running_averages_of_a_short_training_break_eval_mode_and_precise_bn_repairs_it() -> None:
    torch.manual_seed(0)
    train, val = _narrow(32, 0), _narrow(8, 1)
    part = PatchGrid(2, 2)
    model = UNet(1, 3, base_channels=8, depth=2)
    _train_briefly(model, train, part)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return part.stitch(model(part.split(x)), x.shape[0])

    before_eval = model_quality(forward, model, val, 3)
    batch_stats = model_quality(forward, model, val, 3, train_mode=True)
    # The defect: eval mode (running averages) is far below the same weights with batch statistics.
    assert batch_stats.accuracy - before_eval.accuracy > 0.1
    # Scoring in train mode left the running averages as they were.
    assert model_quality(forward, model, val, 3).accuracy == pytest.approx(before_eval.accuracy)
    used = recompute_bn_statistics(model, (part.split(x) for x, _ in train.batches(8)))
    assert used == 4 and model.training  # flags restored (the model was in train mode)
    after = model_quality(forward, model, val, 3)
    assert abs(after.accuracy - batch_stats.accuracy) < 0.03
    assert after.accuracy - before_eval.accuracy > 0.1
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum == 0.1  # restored


def test_recompute_leaves_models_without_batch_norm_alone() -> None:
    model = torch.nn.Conv2d(1, 2, 3)
    assert recompute_bn_statistics(model, [torch.zeros(1, 1, 4, 4)]) == 0
    with pytest.raises(ValueError, match="non-empty batch"):
        recompute_bn_statistics(torch.nn.BatchNorm2d(1), [torch.zeros(0, 1, 4, 4)])


def test_pretraining_validates_every_epoch_and_keeps_the_best_epoch() -> None:
    torch.manual_seed(0)
    pipe = _pipeline()
    train, val = _narrow(16, 0), _narrow(6, 1)
    checks = PretrainChecks(validation=val, num_classes=3)
    # A learning rate far too high: the last epoch is not the best one.
    stage = LargeModelPretraining(pipe, train, StageSettings(4, 0.3, 4), seed=0, checks=checks)
    logs = [stage.train_epoch(e) for e in range(4)]
    scores = [row["val/miou_f1"] for row in logs]
    best_epoch = int(logs[-1]["val/best_epoch_f1"])
    assert best_epoch != 3, "the case must exercise the restore: the last epoch should not be the best"
    assert best_epoch == max(range(3), key=lambda e: scores[e])
    model, part = pipe.zoo[1], pipe.partitioner

    def forward(x: torch.Tensor) -> torch.Tensor:
        return part.stitch(model(part.split(x)), x.shape[0])

    final = model_quality(forward, model, val, 3).mean_iou
    assert final == pytest.approx(max(scores[:3]), abs=1e-6)
    assert scores[3] == pytest.approx(final, abs=1e-6)  # the last log row describes the weights kept
    # The best weights are part of the stage's state: a resumed stage selects the same epoch.
    state = stage.state_dict()
    assert int(state["best"]["f1"]["epoch"]) == best_epoch
    other = LargeModelPretraining(_pipeline(), train, StageSettings(4, 0.3, 4), seed=0, checks=checks)
    other.load_state_dict(state)
    assert other.best["f1"]["score"] == state["best"]["f1"]["score"]


def test_keep_best_off_keeps_the_last_epoch() -> None:
    torch.manual_seed(0)
    pipe = _pipeline()
    train, val = _narrow(16, 0), _narrow(6, 1)
    checks = PretrainChecks(validation=val, num_classes=3, keep_best=False)
    stage = LargeModelPretraining(pipe, train, StageSettings(2, 0.01, 4), seed=0, checks=checks)
    logs = [stage.train_epoch(e) for e in range(2)]
    assert "val/best_epoch_f1" not in logs[-1] and stage.best == {}


def test_warns_when_eval_mode_is_far_below_batch_statistics() -> None:
    torch.manual_seed(0)
    pipe = _pipeline()
    train, val = _narrow(32, 0), _narrow(8, 1)
    checks = PretrainChecks(validation=val, num_classes=3, precise_bn=False)
    stage = LargeModelPretraining(pipe, train, StageSettings(1, 3e-3, 4), seed=0, checks=checks)
    stage.train_epoch(0)
    assert any("batch-norm running statistics" in w and "'f1'" in w for w in stage.warnings), stage.warnings
    fixed = LargeModelPretraining(
        _pipeline(), train, StageSettings(1, 3e-3, 4), seed=0, checks=PretrainChecks(validation=val, num_classes=3)
    )
    fixed.train_epoch(0)
    assert not any("batch-norm" in w for w in fixed.warnings), fixed.warnings


def test_warns_when_a_costlier_model_scores_below_f0() -> None:
    torch.manual_seed(0)
    pipe = _pipeline()
    train, val = _narrow(16, 0), _narrow(6, 1)
    checks = PretrainChecks(validation=val, num_classes=3)
    # f1 untrained (random weights), f0 trained: f1 is below f0.
    stage = BaseModelPretraining(pipe, train, StageSettings(2, 3e-3, 4), seed=0, beta=0.0, checks=checks)
    for e in range(2):
        stage.train_epoch(e)
    assert any("'f1' (costlier)" in w and "below the base model 'f0'" in w for w in stage.warnings), stage.warnings
