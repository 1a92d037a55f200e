"""FLOP counting with fvcore.

Convention (fvcore's): **one multiply-add counts as one flop**, so a ``k x k`` convolution
from ``c_in`` to ``c_out`` channels on an ``h x w`` output costs ``k * k * c_in * c_out * h * w``.
Every GFLOPs figure routerkit prints uses this convention.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

FLOP_CONVENTION = "fvcore convention: one multiply-add = one flop"


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of ``model`` on a single input of ``input_shape`` (no batch dim).

    Args:
        model: Any module; it is traced in eval mode on zeros, on its own device.
        input_shape: Shape of one input, e.g. ``(1, 56, 64)``.

    Returns:
        Total FLOPs (fvcore: one multiply-add = one flop).
    """
    from fvcore.nn import FlopCountAnalysis  # lazy: fvcore imports are slow

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
