"""Route new inputs with a trained run: `load` a run as a `RoutedModel` and `RoutedModel.predict`;
`export_onnx` a run as an ONNX bundle and route with it on a device with `OnnxPipeline` (onnxruntime).

Example:
    >>> import routerkit  # doctest: +SKIP
    >>> model = routerkit.load("runs/battery")  # doctest: +SKIP
    >>> out = model.predict("scan.png")  # doctest: +SKIP
    >>> out.pred.shape, out.usage()  # doctest: +SKIP
"""

from __future__ import annotations

from routerkit.deploy.export import ExportError, ExportResult, export_model, export_onnx
from routerkit.deploy.masks import FixedMaskDropout, fix_mc_masks
from routerkit.deploy.model import Prediction, RoutedModel, load
from routerkit.deploy.onnx_runtime import OnnxOutput, OnnxPipeline, OnnxPrediction
from routerkit.deploy.tiling import Tiling

__all__ = [
    "ExportError",
    "ExportResult",
    "FixedMaskDropout",
    "OnnxOutput",
    "OnnxPipeline",
    "OnnxPrediction",
    "Prediction",
    "RoutedModel",
    "Tiling",
    "export_model",
    "export_onnx",
    "fix_mc_masks",
    "load",
]
