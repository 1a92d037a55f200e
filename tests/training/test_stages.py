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
