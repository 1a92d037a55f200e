"""The server's answers: one routed input as JSON, its mask as a PNG, and the page's pictures.

`Renderer` is built once per app from the `RoutedModel`; `Renderer.answer` turns one input of a
`Prediction` into the JSON body of ``POST /v1/predict``:

- segmentation: ``mask`` (class ids, nested ``[H][W]`` list) or ``mask_png`` (``?format=png``:
  base64 PNG of the data set's mask values, as ``routerkit predict`` writes ``_mask.png``),
  ``routing_map`` (model per unit over the input), ``actions`` and ``action_names`` (the model of
  every unit of every window, row-major per window), ``usage`` (share of the input's units per model);
- classification: ``label`` and ``class_name``, and the model that answered;
- both: ``gflops`` (every pass that ran), ``gflops_largest`` (the largest model alone on every
  unit of the same windows: the single-model router's GFLOPs), ``gflops_saved`` (the share saved),
  ``windows`` and ``batch_inputs`` (inputs routed in the same model call);
- ``?format=page``: ``images``, PNG data URIs of the input, ``f_0``'s uncertainty, the units tinted
  by the model that answered (`routerkit.deploy.writers.routing_overlay_pixels`) and the mask in
  the page's class colours, all enlarged by one integer factor.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from routerkit.deploy.model import Prediction, RoutedModel
from routerkit.deploy.writers import _overlay_scale, mask_pixels, routing_overlay_pixels
from routerkit.routers.baselines import SingleModelRouter
from routerkit.uncertainty import BaseOutput

__all__ = ["FORMATS", "CLASS_CMAP", "UNCERTAINTY_CMAP", "Answer", "Renderer", "png_bytes"]

#: The ``format`` query values of ``POST /v1/predict``.
FORMATS = ("json", "png", "page")
#: Matplotlib colour map of the class colours of the page's masks.
CLASS_CMAP = "Set2"
#: Matplotlib colour map of the page's uncertainty maps.
UNCERTAINTY_CMAP = "magma"


@dataclass
class Answer:
    """One input of a routed batch.

    Attributes:
        prediction: The batch's `Prediction`.
        index: The input's index in it.
        batch_inputs: Inputs routed in the same model call.
    """

    prediction: Prediction
    index: int
    batch_inputs: int


def png_bytes(pixels: np.ndarray) -> bytes:
    """``[H, W]`` uint8 / uint16 or ``[H, W, 3]`` uint8 pixels as PNG bytes."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB" if pixels.ndim == 3 else None)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def _one(value: Tensor | list[Tensor] | None, index: int) -> Tensor:
    assert value is not None
    return value[index]


def _colours(cmap_name: str, count: int) -> list[tuple[float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps[cmap_name if count <= 8 else "hsv"]
    picks = range(count) if count <= 8 else np.linspace(0.0, 1.0, count, endpoint=False)
    return [tuple(float(v) for v in cmap(p)[:3]) for p in picks]  # type: ignore[misc]


class Renderer:
    """Everything the answers need that is fixed for a model: names, colours, the always-largest GFLOPs.

    Args:
        model: The routed model being served.

    Attributes:
        largest: Index of the costliest model on one unit (the "always the largest model" baseline).
        window_gflops: GFLOPs of one window of the trained shape with each model alone on every unit
            (the single-model router's accounting: no state, no policy, unless the model is ``f_0``).
    """

    def __init__(self, model: RoutedModel) -> None:
        from routerkit.flops import FLOP_CONVENTION
        from routerkit.plots import model_colours

        self.model = model
        self.spec = model.spec
        pipe = model.pipeline
        self.model_names = model.model_names
        self.class_names = list(self.spec.class_names)
        self.grid = pipe.partitioner.grid_shape
        shape = self.spec.input_shape
        self.unit_size = (shape[-2] // self.grid[0], shape[-1] // self.grid[1]) if self.spec.spatial else (1, 1)
        unit_flops = pipe.accountant.unit_flops
        self.largest = max(range(len(unit_flops)), key=lambda i: (unit_flops[i], i))
        self.window_gflops = [self._single_model_gflops(i) for i in range(len(self.model_names))]
        self.flop_convention = str(FLOP_CONVENTION)
        self.model_colours = [_hex(c) for c in model_colours(len(self.model_names))]
        self.class_colours_rgb = _colours(CLASS_CMAP, self.spec.num_classes)
        self.class_colours = [_hex(c) for c in self.class_colours_rgb]
        #: Upper end of the uncertainty colour scale: the entropy of a uniform guess (nats).
        self.uncertainty_max = math.log(max(self.spec.num_classes, 2))

    def _single_model_gflops(self, index: int) -> float:
        """GFLOPs of one window with model ``index`` on every unit (`SingleModelRouter`'s accounting)."""
        pipe = self.model.pipeline
        router = SingleModelRouter(len(self.model_names), index=index, grid_shape=self.grid, spatial=self.spec.spatial)
        actions = torch.full((1, pipe.partitioner.num_units), index, dtype=torch.long)
        empty = BaseOutput(torch.zeros(1, 1), torch.zeros(1))
        return float(pipe.flops(actions, router, empty)[0]) / 1e9

    # -------------------------------------------------------------------------- answers

    def answer(self, result: Answer, name: str, fmt: str, image: Tensor | None = None) -> dict[str, Any]:
        """The JSON body for one input.

        Args:
            result: The input's place in its routed batch.
            name: What the request called the input (file name, or ``input``).
            fmt: ``json``, ``png`` or ``page`` (`FORMATS`).
            image: The model-space input ``[C, H, W]`` (needed for ``page``).

        Returns:
            The answer (see the module's docstring).
        """
        pred, i = result.prediction, result.index
        windows = pred.windows[i]
        gflops = float(pred.gflops[i])
        largest = windows * self.window_gflops[self.largest]
        actions = _one(pred.actions, i).flatten()
        body: dict[str, Any] = {
            "name": name,
            "task": self.spec.task,
            "windows": windows,
            "batch_inputs": result.batch_inputs,
            "model_names": self.model_names,
            "actions": actions.tolist(),
            "action_names": [self.model_names[a] for a in actions.tolist()],
            "usage": dict(zip(self.model_names, (float(u) for u in pred.usage()[i]), strict=True)),
            "gflops": gflops,
            "gflops_largest": largest,
            "gflops_saved": 1.0 - gflops / largest if largest > 0 else 0.0,
            "largest_model": self.model_names[self.largest],
            "flop_convention": self.flop_convention,
        }
        label = _one(pred.pred, i)
        if self.spec.spatial:
            routing = _one(pred.routing_map, i)
            body["shape"] = list(label.shape)
            body["routing_map"] = routing.tolist()
            if fmt == "png":
                body["mask_png"] = base64.b64encode(png_bytes(mask_pixels(label, self.spec))).decode("ascii")
            elif fmt == "json":
                body["mask"] = label.tolist()
        else:
            body["label"] = int(label)
            body["class_name"] = self.class_names[int(label)]
            body["model"] = self.model_names[int(actions[0])]
        if fmt == "page":
            body["images"] = self.images(pred, i, image)
            body["uncertainty_range"] = [0.0, self.uncertainty_max]
            if not self.spec.spatial and pred.uncertainty is not None:
                body["uncertainty"] = float(_one(pred.uncertainty, i).float().mean())  # a placeholder map where f_0 did not run
        return body

    def images(self, pred: Prediction, index: int, image: Tensor | None) -> dict[str, str]:
        """The page's pictures of one input as PNG data URIs: ``input``, and for segmentation ``uncertainty``,
        ``routing`` and ``mask``, all of one size (enlarged by `routerkit.deploy.writers`' overlay factor)."""
        out: dict[str, str] = {}
        if image is None or image.dim() != 3:
            return out
        height, width = image.shape[-2:]
        scale = _overlay_scale(int(height), int(width))

        def big(pixels: np.ndarray) -> np.ndarray:
            return pixels.repeat(scale, axis=0).repeat(scale, axis=1)

        out["input"] = _data_uri(big(_input_pixels(image)))
        if not self.spec.spatial:
            return out
        if pred.uncertainty is not None:
            out["uncertainty"] = _data_uri(big(self._uncertainty_pixels(_one(pred.uncertainty, index))))
        routing = _one(pred.routing_map, index)
        out["routing"] = _data_uri(routing_overlay_pixels(image, routing, self.unit_size, self.model_names, legend=False))
        ids = _one(pred.pred, index).cpu().numpy()
        palette = np.round(255 * np.asarray(self.class_colours_rgb, dtype=np.float64)).astype(np.uint8)
        out["mask"] = _data_uri(big(palette[ids]))
        return out

    def _uncertainty_pixels(self, unc: Tensor) -> np.ndarray:
        from matplotlib import colormaps

        values = unc.detach().cpu().double().numpy() / self.uncertainty_max
        rgba = colormaps[UNCERTAINTY_CMAP](np.clip(values, 0.0, 1.0))
        return np.round(255 * rgba[..., :3]).astype(np.uint8)


def _input_pixels(image: Tensor) -> np.ndarray:
    """A model-space input ``[C, H, W]`` for the eye: min-max scaled, RGB for 3 channels, else the channel mean in gray."""
    x = image.detach().cpu().double()
    x = x if x.shape[0] == 3 else x.mean(0, keepdim=True)
    low, high = float(x.min()), float(x.max())
    scaled = ((x - low) / max(high - low, 1e-8)).numpy()
    pixels = np.round(255 * scaled).clip(0, 255).astype(np.uint8)
    return pixels.transpose(1, 2, 0) if pixels.shape[0] == 3 else pixels[0]
