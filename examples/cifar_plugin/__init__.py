"""CIFAR-10 classification plugin: whole-input routing over a zoo of CIFAR ResNets.

The setting of Guan et al. 2018 (energy-efficient cascades of CIFAR-10 classifiers): every image
is one routing unit (``partitioner: whole_input``) and the zoo holds ResNet-8 ... ResNet-110
(``routerkit.models.CifarResNet``). Referenced from the YAML as
``data.factory: cifar_plugin:build_data``; `build_data` reads a local copy (JPEG archives, the
lossless subset or the official python pickles) or downloads the official archive.
"""

from __future__ import annotations

from cifar_plugin.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASS_NAMES,
    SOURCES,
    balanced_order,
    build_data,
    detect_source,
    download_cifar10,
    load_jpeg,
    load_lossless,
    load_pickle,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CLASS_NAMES",
    "SOURCES",
    "balanced_order",
    "build_data",
    "detect_source",
    "download_cifar10",
    "load_jpeg",
    "load_lossless",
    "load_pickle",
]
