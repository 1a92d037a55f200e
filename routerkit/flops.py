"""FLOP counting with fvcore.

Convention (fvcore's): **one multiply-add counts as one flop**, so a ``k x k`` convolution
from ``c_in`` to ``c_out`` channels on an ``h x w`` output costs ``k * k * c_in * c_out * h * w``.
Every GFLOPs figure routerkit prints uses this convention.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

FLOP_CONVENTION = "fvcore convention: one multiply-add = one flop"


def _flop_count_analysis() -> Any:
    """fvcore's ``FlopCountAnalysis``, imported without the warning of fvcore's own package import.

    ``import fvcore.nn`` runs ``fvcore/nn/focal_loss.py``, which calls ``torch.jit.script`` at import
    time; current torch answers with a ``FutureWarning`` ("`torch.jit.script` is deprecated") that
    otherwise lands in the middle of every run's progress bars. routerkit never uses that loss, so
    exactly that warning is ignored, during that import only; every other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of ``model`` on a single input of ``input_shape`` (no batch dim).

    Args:
        model: Any module; it is traced in eval mode on zeros, on its own device.
        input_shape: Shape of one input, e.g. ``(1, 56, 64)``.

    Returns:
        Total FLOPs (fvcore: one multiply-add = one flop).
    """
    FlopCountAnalysis = _flop_count_analysis()  # lazy: fvcore imports are slow

    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, (x,))
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            total = int(analysis.total())
    finally:
        for m, training in modes:
            m.training = training
    return total
