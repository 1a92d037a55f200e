"""Noisy MNIST plugin (PaSeR paper R4): foreground/background segmentation under three blurs.

Every image is degraded by one of three noise types, in equal shares: Gaussian blur of radius
(standard deviation) 1, Gaussian blur of radius 2, and a box blur with a fixed filter. The
target is the clean digit's foreground (pixels above half intensity). Each task model is
trained on its own noise type only (``zoo.models[i].train_on: {noise: i}``), so the zoo has
complementary strengths and the right model for an input is known: the split meta ``noise``
holds it (``evaluation.expert_key: noise``).

Referenced from the YAML as ``data.factory: mnist_plugin:build_data``.
"""

from __future__ import annotations

from mnist_plugin.data import NOISE_NAMES, apply_noise, build_data, load_mnist, read_idx, write_idx

__all__ = ["NOISE_NAMES", "apply_noise", "build_data", "load_mnist", "read_idx", "write_idx"]
