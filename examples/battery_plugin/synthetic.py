"""Synthetic stand-in for low-resolution micro-tomography of battery electrode coatings.

Each sample has a high-resolution label map of three phases (0 = pore, 1 = carbon binder,
2 = nickel active material, nickel the majority) and a degraded input: phase intensities
with texture, blurred (point-spread function), down-sampled by ``downsample``, corrupted by
Gaussian noise and up-sampled back to the label grid (the low-res scan registered to the
high-res labels, as in PaSeR's data).

Difficulty varies in space, in three tiers, as a ladder of models needs. A smooth random
*fineness* field (correlation length ``region_scale``) splits every image into:

- **segregated regions** (about half): large grains (``coarse_scale``), dense nickel, the three
  phases at distinct grey values (pore darkest, binder grey, nickel bright): the tiny base
  model's job;
- **agglomerates** (``medium_share``): pore- and binder-rich, at ``medium_scale``, where the
  scan's partial-volume effect (``partial_volume``) gives pore and binder one grey value; only
  the nano-porous binder's grain (``medium_grain``, a local-variance cue) against a filled
  pore's smooth grey tells them apart: a medium model's job;
- **finely interspersed regions** (``fine_share``), at ``fine_scale``, near the resolution
  limit, with the same partial volume: only the binder's fibrous streaks (one direction per
  image) against a filled pore's isotropic speckle of the same energy (``fibres``) tell them
  apart, which takes many oriented filters (capacity): the large model's job.

The fineness map is returned too (``meta["fineness"]``: 0, 0.5 and 1 for the three tiers) so
routing can be inspected.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_NAMES = ["pore", "carbon", "nickel"]


def _smooth_noise(shape: tuple[int, int, int], scale: float, generator: torch.Generator) -> Tensor:
    """Gaussian random field ``[N, H, W]`` with correlation length ``scale`` px, zero mean, unit std."""
    _, h, w = shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).reshape(h, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).reshape(1, -1)
    kernel = torch.exp(-2.0 * (math.pi * scale) ** 2 * (fx**2 + fy**2))
    field = torch.fft.irfft2(torch.fft.rfft2(noise) * kernel, s=(h, w))
    field = field - field.mean(dim=(1, 2), keepdim=True)
    return (field / field.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)).float()


def _band_noise(shape: tuple[int, int, int], wavelength: float, generator: torch.Generator, oriented: bool) -> Tensor:
    """Band-pass texture ``[N, H, W]`` at ``wavelength`` px, unit std; ``oriented``: one random direction per image.

    An oriented texture (fibrous streaks) and an isotropic one of the same wavelength and variance
    have the same local energy: telling them apart needs several oriented filters, i.e. capacity.
    """
    n, h, w = shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).reshape(1, h, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).reshape(1, 1, -1)
    f0, bw = 1.0 / wavelength, 0.25 / wavelength
    if oriented:
        theta = torch.rand(n, 1, 1, generator=generator, dtype=torch.float64) * math.pi
        along = fx * torch.cos(theta) + fy * torch.sin(theta)
        across = -fx * torch.sin(theta) + fy * torch.cos(theta)
        kernel = torch.exp(-((along.abs() - f0) ** 2 + across**2) / (2 * bw**2))
    else:
        kernel = torch.exp(-((torch.sqrt(fx**2 + fy**2) - f0) ** 2) / (2 * bw**2))
    field = torch.fft.irfft2(torch.fft.rfft2(noise) * kernel, s=(h, w))
    field = field - field.mean(dim=(1, 2), keepdim=True)
    return (field / field.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)).float()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[N, 1, H, W]`` with reflect padding."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.reshape(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.reshape(1, 1, -1, 1))


def _phases(
    field: Tensor,
    fine: Tensor,
    coarse_fractions: tuple[float, ...],
    fine_fractions: tuple[float, ...],
    split_field: Tensor | None = None,
) -> Tensor:
    """Threshold a unit-variance field with cuts that move with the fineness map.

    Segregated regions get ``coarse_fractions`` of (pore, carbon, nickel) and interspersed
    regions ``fine_fractions``; the cuts are Gaussian quantiles blended by ``fine``.
    """
    normal = torch.distributions.Normal(0.0, 1.0)

    def cuts(fr: tuple[float, ...]) -> Tensor:
        return normal.icdf(torch.tensor([fr[0], fr[0] + fr[1]], dtype=torch.float32))

    c, f = cuts(coarse_fractions), cuts(fine_fractions)
    low = (1.0 - fine) * c[0] + fine * f[0]
    high = (1.0 - fine) * c[1] + fine * f[1]
    nickel = field > high
    if split_field is None:
        return torch.where(nickel, 2, (field > low).long())
    # pore / binder split by an independent field: where the binder lies is not implied by the nickel.
    share = normal.cdf(low) / normal.cdf(high).clamp_min(1e-6)  # pore share of the non-nickel phases
    return torch.where(nickel, 2, (split_field > normal.icdf(share.clamp(1e-4, 1 - 1e-4))).long())


def generate_battery(
    num_samples: int,
    height: int = 112,
    width: int = 128,
    seed: int = 0,
    coarse_scale: float = 10.0,
    fine_scale: float = 5.0,
    region_scale: float = 20.0,
    fine_share: float = 0.2,
    medium_share: float = 0.3,
    medium_scale: float = 6.0,
    medium_grain: float = 0.06,
    coarse_fractions: tuple[float, float, float] = (0.08, 0.12, 0.80),
    fine_fractions: tuple[float, float, float] = (0.30, 0.35, 0.35),
    intensities: tuple[float, float, float] = (0.15, 0.35, 0.75),
    partial_volume: float = 1.0,
    independent_binder: float = 0.0,
    texture: float | tuple[float, float, float] = (0.01, 0.02, 0.02),
    texture_scale: float = 1.2,
    fibres: float = 0.25,
    fibre_wavelength: float = 3.5,
    psf_sigma: float = 0.6,
    downsample: int = 1,
    noise: float = 0.06,
    chunk: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``num_samples`` synthetic electrode-coating scans.

    Args:
        num_samples: Number of images.
        height: Image height (PaSeR: 224).
        width: Image width (PaSeR: 256).
        seed: Seed; the same seed gives the same data.
        coarse_scale: Correlation length (px) of segregated regions.
        fine_scale: Correlation length (px) of interspersed regions.
        region_scale: Correlation length (px) of the fineness field.
        fine_share: Expected share of the image that is finely interspersed.
        medium_share: Expected share of an intermediate tier between segregated and finely
            interspersed regions: pore- and binder-rich agglomerates of correlation length
            ``medium_scale`` with the same partial-volume grey value, where the carbon binder's
            nano-porous grain (std ``medium_grain`` on top of ``texture``) against a filled
            pore's smooth grey tells them apart: a local-variance cue, easier than the fibres'
            orientation (0 disables the tier).
        medium_scale: Correlation length (px) of the intermediate tier.
        medium_grain: Extra grain std of the carbon binder in the intermediate tier.
        coarse_fractions: Phase fractions (pore, carbon, nickel) in segregated regions (dense nickel).
        fine_fractions: Phase fractions in interspersed regions (binder- and pore-rich agglomerates).
        intensities: Mean grey value of each phase in segregated regions.
        partial_volume: Share of the pore / binder contrast lost where phases are finely
            interspersed (partial-volume effect of the coarse scan; 1 = one grey value there).
        independent_binder: In interspersed regions, how far the pore / binder split follows a field
            independent of the nickel (0: pores nested inside binder bands; 1: independent), which
            removes the geometric cue and leaves only texture.
        texture: Std of the high-frequency texture, one value or one per phase (a nano-porous carbon
            binder is grainy where a filled pore is smooth).
        texture_scale: Correlation length (px) of that texture.
        fibres: Amplitude of a band-pass texture at ``fibre_wavelength`` px: oriented (fibrous
            streaks, one direction per image) in the carbon binder, isotropic with the same
            energy in pores. 0 disables it.
        fibre_wavelength: Wavelength (px) of that texture.
        psf_sigma: Blur (px) of the scanner's point-spread function.
        downsample: Resolution loss of the scan (the input is down-sampled by this factor).
        noise: Std of the detector noise.
        chunk: Samples generated per vectorised chunk.

    Returns:
        ``(images [N, 1, H, W] float32 in about [0, 1], labels [N, H, W] int64, fineness [N, H, W] float32)``;
        fineness is 0 in segregated regions, 0.5 in the intermediate tier and 1 where finely interspersed.
    """
    if num_samples < 0 or height < 8 or width < 8:
        raise ValueError(f"Expected num_samples >= 0 and an image of at least 8 x 8 but got {num_samples}, {height} x {width}.")
    if height % downsample or width % downsample:
        raise ValueError(f"Expected height and width divisible by downsample={downsample} but got {height} x {width}.")
    for name, fr in (("coarse_fractions", coarse_fractions), ("fine_fractions", fine_fractions)):
        if len(fr) != 3 or abs(sum(fr) - 1.0) > 1e-6 or min(fr) <= 0:
            raise ValueError(f"Expected {name} to be three positive phase fractions summing to 1 but got {fr}.")
    if not 0.0 < fine_share < 1.0:
        raise ValueError(f"Expected fine_share in (0, 1) but got {fine_share}.")
    generator = torch.Generator().manual_seed(seed)
    images, labels, fineness = [], [], []
    level = torch.tensor(intensities)
    grain = torch.tensor(texture if isinstance(texture, (tuple, list)) else (texture,) * 3, dtype=torch.float32)
    if grain.shape != (3,):
        raise ValueError(f"Expected texture to be one number or three (one per phase) but got {texture}.")
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        shape = (n, height, width)
        region = _smooth_noise(shape, region_scale, generator)
        flat = region.reshape(n, -1)
        cut = torch.quantile(flat, 1.0 - fine_share, dim=1).reshape(n, 1, 1)
        fine = torch.sigmoid((region - cut) * 6.0)  # soft region mask, 1 = finely interspersed
        coarse_field = _smooth_noise(shape, coarse_scale, generator)
        fine_field = _smooth_noise(shape, fine_scale, generator)
        medium = torch.zeros_like(fine)
        if medium_share > 0:
            mid_cut = torch.quantile(flat, max(1.0 - fine_share - medium_share, 0.0), dim=1).reshape(n, 1, 1)
            medium = (torch.sigmoid((region - mid_cut) * 6.0) - fine).clamp_min(0.0)
            medium_field = _smooth_noise(shape, medium_scale, generator)
            field = (1.0 - fine - medium) * coarse_field + medium * medium_field + fine * fine_field
        else:
            field = (1.0 - fine) * coarse_field + fine * fine_field
        mixed = fine + medium  # pore- and binder-rich, one partial-volume grey for both
        split = None
        if independent_binder > 0:
            other = (1.0 - fine) * _smooth_noise(shape, coarse_scale, generator) + fine * _smooth_noise(
                shape, fine_scale, generator
            )
            split = (1.0 - independent_binder * fine) * field + independent_binder * fine * other
        label = _phases(field, mixed, coarse_fractions, fine_fractions, split)
        mid = 0.5 * (level[0] + level[1])
        means = level[label] + partial_volume * mixed * (label < 2).float() * (mid - level[label])
        std = grain[label] + medium_grain * medium * (label == 1).float()
        clean = means + std * _smooth_noise(shape, texture_scale, generator)
        if fibres > 0:
            streaks = _band_noise(shape, fibre_wavelength, generator, oriented=True)
            speckle = _band_noise(shape, fibre_wavelength, generator, oriented=False)
            cue = torch.where(label == 1, streaks, torch.where(label == 0, speckle, torch.zeros_like(speckle)))
            clean = clean + fibres * (1.0 - medium) * cue  # the intermediate tier has the grain cue only
        x = _gaussian_blur(clean.unsqueeze(1), psf_sigma)
        if downsample > 1:
            x = F.avg_pool2d(x, downsample)
        x = x + noise * torch.randn(x.shape, generator=generator)
        if downsample > 1:
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        images.append(x.clamp(0.0, 1.0))
        labels.append(label)
        fineness.append(fine + 0.5 * medium)
    if not images:
        return torch.zeros(0, 1, height, width), torch.zeros(0, height, width, dtype=torch.long), torch.zeros(0, height, width)
    return torch.cat(images), torch.cat(labels), torch.cat(fineness)
