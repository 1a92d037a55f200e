"""Salt-and-pepper noise and the R3 report pieces."""

from __future__ import annotations

import pytest
import torch

from routerkit.robustness import salt_and_pepper


def test_salt_and_pepper_hits_the_requested_share() -> None:
    x = torch.full((4, 3, 64, 64), 0.5)
    noisy = salt_and_pepper(x, 0.01, torch.Generator().manual_seed(0), low=0.0, high=1.0)
    hit = (noisy != 0.5).any(1)
    assert float(hit.float().mean()) == pytest.approx(0.01, abs=0.003)
    changed = noisy.permute(1, 0, 2, 3)[:, hit]  # every channel of a hit pixel is set
    assert set(changed.unique().tolist()) <= {0.0, 1.0}
    assert 0.3 < float((changed[0] == 1.0).float().mean()) < 0.7  # about half salt, half pepper
    assert torch.equal(salt_and_pepper(x, 0.0), x)
    again = salt_and_pepper(x, 0.01, torch.Generator().manual_seed(0), low=0.0, high=1.0)
    assert torch.equal(again, noisy)


def test_salt_and_pepper_defaults_and_errors() -> None:
    x = torch.rand(2, 1, 16, 16)
    noisy = salt_and_pepper(x, 0.5, torch.Generator().manual_seed(1))
    assert float(noisy.min()) == float(x.min()) and float(noisy.max()) == float(x.max())
    with pytest.raises(ValueError, match="amount"):
        salt_and_pepper(x, 1.5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        salt_and_pepper(x[0], 0.1)
