"""Run an exported ONNX bundle (``routerkit export RUN --format onnx``) with onnxruntime and numpy.

`OnnxPipeline` is the edge counterpart of `routerkit.RoutedModel`: the edge graph gives each
unit's action and ``f_0``'s probabilities, and the executor is reimplemented in numpy: units are
cut from the input (widened by the partitioner's halo, reflected at the border, as
`routerkit.PatchGrid.split_inputs`), each costlier model runs once on the units routed to it (a
cascade: stage by stage, while the stage's ``stop`` output says go on), its output is cropped
back to the unit (`routerkit.PatchGrid.crop`), and the units are stitched into the input's
probabilities. Units with action 0 keep ``f_0``'s probabilities. GFLOPs per input are counted
from the manifest as the pipeline counts them.

This module imports only numpy, the standard library and onnxruntime (lazily: ``pip install
'routerkit[deploy]'``), never torch, so it can be copied next to a bundle onto a device.

Example:
    >>> from routerkit.deploy import OnnxPipeline  # doctest: +SKIP
    >>> edge = OnnxPipeline("runs/battery/export/onnx/manifest.json")  # doctest: +SKIP
    >>> out = edge.predict(batch)  # batch: float32 [B, 1, 112, 128] in model space  # doctest: +SKIP
    >>> out.pred.shape, out.actions.shape, out.gflops  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OnnxOutput", "OnnxPipeline", "OnnxPrediction", "load_manifest"]

_FORMAT = "routerkit-onnx"
_FORMAT_VERSION = 1
_EXTRA = "pip install 'routerkit[deploy]'"
_REQUIRED = {
    "format": str,
    "format_version": int,
    "task": str,
    "input_shape": list,
    "model_unit_shape": list,
    "partitioner": dict,
    "class_names": list,
    "router": dict,
    "edge": dict,
    "models": list,
    "gflops": dict,
}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"OnnxPipeline needs onnxruntime, part of routerkit's deploy extra: {_EXTRA}.") from None
    return onnxruntime


def load_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read and check a bundle's ``manifest.json`` (a file, or the bundle folder holding one).

    Returns:
        ``(manifest file, content)``.

    Raises:
        FileNotFoundError: No manifest there.
        ValueError: Not JSON, not a routerkit ONNX manifest, another format version, a missing or
            mistyped field, or a graph file it names is missing; the message names the file and field.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "manifest.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no ONNX bundle manifest there (write one with `routerkit export RUN --format onnx`).")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: expected the JSON manifest `routerkit export` writes ({err}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object but got {type(raw).__name__}.")
    for key, kind in _REQUIRED.items():
        if key not in raw:
            raise ValueError(f"{file}: expected the field {key!r} ({kind.__name__}) but it is missing.")
        if not isinstance(raw[key], kind):
            raise ValueError(f"{file}: expected {key!r} to be a {kind.__name__} but got {type(raw[key]).__name__}.")
    if raw["format"] != _FORMAT:
        raise ValueError(f"{file}: expected format {_FORMAT!r} but got {raw['format']!r}.")
    if raw["format_version"] != _FORMAT_VERSION:
        raise ValueError(
            f"{file}: expected format_version {_FORMAT_VERSION} but got {raw['format_version']}; export the run again "
            "with this routerkit version."
        )
    models = raw["models"]
    if len(models) < 2 or any(not isinstance(m, dict) or m.get("index") != i for i, m in enumerate(models)):
        raise ValueError(f"{file}: expected 'models' to list f_0 and the costlier models by index 0, 1, ... but got {models!r}.")
    for entry in [raw["edge"], *models[1:]]:
        name = entry.get("file")
        if not isinstance(name, str) or not (file.parent / name).is_file():
            raise ValueError(f"{file}: the graph file {name!r} it names is missing from {file.parent}.")
    missing = [key for key in ("state", "unit") if key not in raw["gflops"]]
    if missing:
        raise ValueError(f"{file}: expected gflops.{missing[0]} (GFLOPs per input / per unit of each model) but it is missing.")
    if raw["router"].get("kind") not in ("pick_first", "cascade"):
        raise ValueError(f"{file}: expected router.kind 'pick_first' or 'cascade' but got {raw['router'].get('kind')!r}.")
    return file, raw


@dataclass
class OnnxOutput:
    """One routed batch (`OnnxPipeline.route`).

    Attributes:
        probs: ``[B, K, ...]`` stitched probabilities.
        actions: ``[B, P]`` model that answered each unit.
        flops: ``[B]`` float64 FLOPs per input (the manifest's convention).
        base_probs: ``[B, K, ...]`` ``f_0``'s probabilities (its state).
        uncertainty: ``[B, ...]`` ``f_0``'s uncertainty.
    """

    probs: np.ndarray
    actions: np.ndarray
    flops: np.ndarray
    base_probs: np.ndarray
    uncertainty: np.ndarray


@dataclass
class OnnxPrediction:
    """What `OnnxPipeline.predict` returns for B inputs (the fields of `routerkit.Prediction`, as numpy arrays).

    Attributes:
        pred: Class ids ``[B, H, W]`` (segmentation) or ``[B]`` (classification).
        actions: ``[B, P]`` model index that answered each unit.
        gflops: ``[B]`` GFLOPs per input.
        model_names: Name of each model index.
        class_names: Name of each class id.
        routing_map: Segmentation: actions laid out on the unit grid ``[B, rows, cols]``; else ``None``.
        probs: ``[B, K, ...]`` class probabilities when asked for.
    """

    pred: np.ndarray
    actions: np.ndarray
    gflops: np.ndarray
    model_names: list[str]
    class_names: list[str]
    routing_map: np.ndarray | None = None
    probs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def usage(self) -> np.ndarray:
        """``[B, m + 1]`` share of each input's units answered by each model."""
        m = len(self.model_names)
        return np.stack([np.bincount(a, minlength=m) / a.size for a in self.actions.reshape(len(self), -1)])


class OnnxPipeline:
    """An exported bundle, routed with onnxruntime and a numpy executor.

    Args:
        manifest: The bundle's ``manifest.json`` (or its folder).
        providers: onnxruntime execution providers (default: the CPU).
        threads: Intra-op threads of each session (default: onnxruntime's).
        max_units: Optional cap on units per model call (memory); larger groups are chunked.

    Raises:
        ImportError: onnxruntime is not installed.
        FileNotFoundError / ValueError: What `load_manifest` raises.
    """

    def __init__(
        self,
        manifest: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        max_units: int | None = None,
    ) -> None:
        ort = _onnxruntime()
        self.manifest_path, self.manifest = load_manifest(manifest)
        if max_units is not None and max_units < 1:
            raise ValueError(f"Expected max_units >= 1 or None but got {max_units}.")
        self.max_units = max_units
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        chosen = list(providers) if providers is not None else ["CPUExecutionProvider"]
        folder = self.manifest_path.parent

        def session(name: str) -> Any:
            return ort.InferenceSession(str(folder / name), options, providers=chosen)

        m = self.manifest
        self._edge = session(m["edge"]["file"])
        self._models: list[Any] = [None, *(session(entry["file"]) for entry in m["models"][1:])]
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in m["input_shape"])
        self.model_unit_shape: tuple[int, ...] = tuple(int(s) for s in m["model_unit_shape"])
        part = m["partitioner"]
        self.grid_shape: tuple[int, int] = (int(part["grid"][0]), int(part["grid"][1]))
        self.halo = int(part.get("halo", 0))
        self.patch_grid = part.get("name") == "patch_grid"
        self.cascade = m["router"]["kind"] == "cascade"
        gflops = m["gflops"]
        self._unit_flops = np.asarray(gflops["unit"], dtype=np.float64) * 1e9
        self._stop_flops = np.asarray(gflops.get("stop", [0.0] * len(self._unit_flops)), dtype=np.float64) * 1e9
        self._fixed_flops = (float(gflops["state"]) + float(gflops.get("policy", 0.0))) * 1e9
        if len(self._unit_flops) != len(m["models"]):
            raise ValueError(f"{self.manifest_path}: expected gflops.unit with {len(m['models'])} entries (one per model).")

    # ------------------------------------------------------------------ description

    @property
    def model_names(self) -> list[str]:
        """Name of each model index (``f_0`` first)."""
        return [str(entry["name"]) for entry in self.manifest["models"]]

    @property
    def class_names(self) -> list[str]:
        """Name of each class id."""
        return [str(c) for c in self.manifest["class_names"]]

    @property
    def num_units(self) -> int:
        """Units P per input."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def spatial(self) -> bool:
        """Whether inputs are images with one class per pixel (segmentation)."""
        return self.manifest["task"] == "segmentation" and len(self.input_shape) == 3

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels ``[C, H, W]`` or ``[B, C, H, W]`` of a file into model space (the manifest's normalisation).

        8-bit and 16-bit integers are scaled into [0, 1] (``scale: auto``), then the mean is
        subtracted and the result divided by the std, per channel.

        Raises:
            ValueError: ``scale: auto`` and pixels that are neither 8 nor 16-bit integers.
        """
        norm = self.manifest.get("normalisation") or {}
        x = np.asarray(pixels)
        out = x.astype(np.float32)
        if norm.get("scale", "auto") == "auto" and x.dtype.kind in "iu":
            if x.dtype == np.uint8:
                out /= np.float32(255.0)
            elif x.dtype == np.uint16:
                out /= np.float32(65535.0)
            else:
                raise ValueError(f"Expected 8-bit or 16-bit pixels (the run scales files into [0, 1]) but got dtype {x.dtype}.")
        channel_axis = out.ndim - len(self.input_shape)
        shape = [1] * out.ndim
        shape[channel_axis] = -1
        if norm.get("mean") is not None:
            out = out - np.asarray(norm["mean"], dtype=np.float32).reshape(shape)
        if norm.get("std") is not None:
            out = out / np.asarray(norm["std"], dtype=np.float32).reshape(shape)
        return out

    def mask_image(self, pred: np.ndarray) -> np.ndarray:
        """Class ids ``[..., H, W]`` as the pixel values of the data set's mask files (the manifest's mask_values)."""
        values = self.manifest.get("mask_values")
        if not values:
            return pred.astype(np.uint8 if len(self.class_names) <= 256 else np.uint16)
        table = np.zeros(len(self.class_names), dtype=np.uint16 if max(values.values()) > 255 else np.uint8)
        for k, v in values.items():
            table[int(k)] = v
        return table[pred]

    # ------------------------------------------------------------------ the partitioner in numpy

    def split(self, x: np.ndarray) -> np.ndarray:
        """``[B, C, H, W]`` (or ``[B, H, W]``) -> units ``[B * P, C, h, w]`` row-major per input (`PatchGrid.split`)."""
        if not self.patch_grid:
            return x
        squeeze = x.ndim == 3
        if squeeze:
            x = x[:, None]
        b, c, height, width = x.shape
        rows, cols = self.grid_shape
        h, w = height // rows, width // cols
        units = x.reshape(b, c, rows, h, cols, w).transpose(0, 2, 4, 1, 3, 5).reshape(b * rows * cols, c, h, w)
        return units[:, 0] if squeeze else units

    def split_inputs(self, x: np.ndarray) -> np.ndarray:
        """The units a model runs on: `split`, each widened by the halo (reflected at the border; `PatchGrid.split_inputs`)."""
        a = self.halo
        if a == 0 or not self.patch_grid:
            return self.split(x)
        b, c, height, width = x.shape
        rows, cols = self.grid_shape
        h, w = height // rows, width // cols
        padded = np.pad(x, ((0, 0), (0, 0), (a, a), (a, a)), mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h + 2 * a, w + 2 * a), axis=(2, 3))[:, :, ::h, ::w]
        # [B, C, rows, cols, h + 2a, w + 2a] -> [B * P, C, h + 2a, w + 2a]
        return np.ascontiguousarray(windows[:, :, :rows, :cols].transpose(0, 2, 3, 1, 4, 5)).reshape(
            b * rows * cols, c, h + 2 * a, w + 2 * a
        )

    def crop(self, unit_outputs: np.ndarray) -> np.ndarray:
        """A model's output on `split_inputs` units cut back to the units (`PatchGrid.crop`)."""
        a = self.halo
        return unit_outputs if a == 0 or not self.patch_grid else unit_outputs[..., a:-a, a:-a]

    def stitch(self, units: np.ndarray, batch_size: int) -> np.ndarray:
        """Inverse of `split` for ``batch_size`` inputs."""
        if not self.patch_grid:
            return units
        rows, cols = self.grid_shape
        _, c, h, w = units.shape
        return (
            units.reshape(batch_size, rows, cols, c, h, w).transpose(0, 3, 1, 4, 2, 5).reshape(batch_size, c, rows * h, cols * w)
        )

    # ------------------------------------------------------------------ routing

    def _run_model(self, index: int, units: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Model ``index`` on ``units`` in chunks: (cropped probabilities, stop decisions or ``None``)."""
        session = self._models[index]
        step = self.max_units or units.shape[0]
        probs, stops = [], []
        names = [o.name for o in session.get_outputs()]
        for i in range(0, units.shape[0], step):
            out = session.run(None, {"units": np.ascontiguousarray(units[i : i + step])})
            probs.append(self.crop(out[0]))
            if "stop" in names:
                stops.append(out[names.index("stop")].astype(bool).reshape(-1))
        stop = np.concatenate(stops) if stops else None
        return np.concatenate(probs) if len(probs) > 1 else probs[0], stop

    def _check(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"Expected a numpy array [B, {', '.join(map(str, self.input_shape))}] but got {type(x).__name__}.")
        if tuple(x.shape[1:]) != self.input_shape or x.shape[0] == 0:
            raise ValueError(
                f"Expected inputs of shape [B >= 1, {', '.join(map(str, self.input_shape))}] (the trained shape, model space) "
                f"but got {list(x.shape)}; resize or tile other sizes first (routerkit.load tiles them)."
            )
        if not np.isfinite(x).all():
            raise ValueError(f"Expected finite inputs but got {int((~np.isfinite(x)).sum())} NaN/inf values.")
        return np.ascontiguousarray(x, dtype=np.float32)

    def route(self, x: np.ndarray) -> OnnxOutput:
        """Route a batch ``x [B, *input_shape]`` (float32, model space) end to end.

        Raises:
            TypeError: ``x`` is not a numpy array.
            ValueError: Another shape than the trained one, an empty batch, or NaN/inf values.
        """
        x = self._check(x)
        batch = x.shape[0]
        actions, base_probs, uncertainty = self._edge.run(["actions", "probs", "uncertainty"], {"x": x})
        units = self.split_inputs(x)
        out = self.split(base_probs).copy()
        flat = actions.reshape(-1).astype(np.int64)
        num_models = len(self._models)
        if self.cascade:
            active = flat == 1  # the edge graph's stage-0 decision: go on to f_1
            flat = np.zeros_like(flat)
            for i in range(1, num_models):
                idx = np.nonzero(active)[0]
                if idx.size == 0:
                    break
                probs, stop = self._run_model(i, units[idx])
                out[idx] = probs.astype(out.dtype)
                flat[idx] = i
                if i == num_models - 1:
                    break
                if stop is None:
                    raise ValueError(f"{self.manifest_path}: cascade stage {i} ({self.model_names[i]}) has no 'stop' output.")
                active = np.zeros_like(active)
                active[idx[~stop]] = True
        else:
            routed: np.ndarray | None = out if (flat == 0).any() else None  # f_0's placeholder when it did not run
            for i in range(1, num_models):
                idx = np.nonzero(flat == i)[0]
                if idx.size:
                    probs = self._run_model(i, units[idx])[0]
                    if routed is None:
                        routed = np.zeros((flat.shape[0], *probs.shape[1:]), dtype=probs.dtype)
                    routed[idx] = probs.astype(routed.dtype)
            if routed is None:
                raise ValueError("No unit was routed anywhere (empty batch?).")
            out = routed
        actions = flat.reshape(batch, self.num_units)
        probs = self.stitch(out, batch)
        return OnnxOutput(probs, actions, self.flops(actions), base_probs, uncertainty)

    def flops(self, actions: np.ndarray) -> np.ndarray:
        """``[B]`` float64 FLOPs per input of decisions ``actions [B, P]``, counted as `RoutedPipeline.flops`.

        ``f_0``'s state and the router's network per input, plus each unit's model (a cascade:
        every stage the unit reached, and the stop decision after each of them); ``f_0`` costs
        nothing per unit (it ran on the whole input).
        """
        num_models = len(self._unit_flops)
        onehot = np.eye(num_models, dtype=np.int64)[actions]  # [B, P, A]
        paid = onehot[..., ::-1].cumsum(-1)[..., ::-1] if self.cascade else onehot
        counts = paid.sum(1).astype(np.float64)  # [B, A]
        per_unit = self._unit_flops.copy()
        per_unit[0] = 0.0
        total = counts @ per_unit + self._fixed_flops
        if self.cascade:
            total = total + counts @ self._stop_flops
        return np.asarray(total, dtype=np.float64)

    def predict(self, inputs: np.ndarray, batch_size: int = 32, probs: bool = False) -> OnnxPrediction:
        """Route inputs of the trained shape in batches.

        Args:
            inputs: ``[B, *input_shape]`` or one ``[*input_shape]`` float array in model space
                (see `preprocess` for file pixels).
            batch_size: Inputs routed together.
            probs: Also return the class probabilities.

        Returns:
            The `OnnxPrediction`.

        Raises:
            ValueError: A bad ``batch_size`` or inputs of another shape (what `route` raises).
        """
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1 but got {batch_size}.")
        x = np.asarray(inputs)
        if x.ndim == len(self.input_shape):
            x = x[None]
        outs = [self.route(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        all_probs = np.concatenate([o.probs for o in outs])
        actions = np.concatenate([o.actions for o in outs])
        gflops = np.concatenate([o.flops for o in outs]) / 1e9
        routing = actions.reshape(-1, *self.grid_shape) if self.spatial else None
        return OnnxPrediction(
            pred=all_probs.argmax(1),
            actions=actions,
            gflops=gflops,
            model_names=self.model_names,
            class_names=self.class_names,
            routing_map=routing,
            probs=all_probs if probs else None,
        )
