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
