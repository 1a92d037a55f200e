"""Random augmentation of training batches: flips for segmentation, flip-and-crop for classification.

Every draw comes from the stage's own ``generator``, in a fixed order, so a seeded stage sees the
same augmented batches on every run and after a resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _augment(images: Tensor, targets: Tensor, generator: torch.Generator, *extra: Tensor) -> tuple[Tensor, ...]:
    """Random flips of a batch.

    Segmentation (``[N, H, W]`` targets): horizontal / vertical flips of images, masks and
    ``extra`` (same flip per batch). Image classification (``[N]`` labels): the standard CIFAR
    augmentation, a per-sample horizontal flip and a random crop after zero-padding by 1/8 of
    the side; labels and ``extra`` are unchanged.
    """
    out = (images, targets, *extra)
    if images.dim() == 4 and targets.dim() == 1:
        return (_flip_and_crop(images, generator), targets, *extra)
    if images.dim() != 4 or targets.dim() != 3:
        return out
    if bool(torch.rand((), generator=generator) < 0.5):
        out = tuple(t.flip(-1) for t in out)
    if bool(torch.rand((), generator=generator) < 0.5):
        out = tuple(t.flip(-2) for t in out)
    return out


def _flip_and_crop(images: Tensor, generator: torch.Generator) -> Tensor:
    n, _, h, w = images.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    pad = max(h, w) // 8
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # [N, h, 1]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [N, 1, w]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # one gather for the whole batch
