"""Small contracts of the training stages."""

from __future__ import annotations

import torch

from routerkit.training.stages import _ce


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
    from routerkit.training.stages import _augment

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
