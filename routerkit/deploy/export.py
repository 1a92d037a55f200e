"""Export a trained run as an ONNX bundle for edge runtimes: ``routerkit export RUN --format onnx``.

A bundle is a folder with:

- ``edge.onnx``: the edge graph, input ``x [B, *input_shape]`` (model space) -> ``actions [B, P]``
  (int64), ``probs [B, K, ...]`` and ``uncertainty [B, ...]``: ``f_0`` with its state (all N
  MC-dropout passes, or the shared trunk and N heads) and the router. For a pick-first router
  (PaSeR, single) ``actions`` are the chosen model per unit; for a cascade (IDK, optimal
  stopping) they are the stage-0 decision, 0 = answered by ``f_0``, 1 = sent on to ``f_1``.
- one ``<index>_<name>.onnx`` per costlier model: ``units [U, C, h + 2 halo, w + 2 halo]`` ->
  ``probs [U, K, h + 2 halo, w + 2 halo]`` (softmax of the model on each unit widened by the
  partitioner's halo; the runtime crops it), dynamic U; in a cascade every stage but the last
  also outputs ``stop [U]`` (bool), its stop decision taken on the cropped unit.
- ``manifest.json``: everything a runtime needs besides the graphs (`routerkit.deploy.OnnxPipeline`):
  model names and files, input and unit shapes, the unit grid and halo, costs and GFLOPs, class
  names, mask values, normalisation, the FLOP convention, the opset, versions, and how far each
  graph is from PyTorch on a random batch.

**Deterministic state.** MC dropout draws random masks; an ONNX runtime cannot repeat torch's
generator. The export draws the N passes' masks once from ``mask_seed`` and bakes them into the
edge graph as constants (`routerkit.deploy.masks`); ``routerkit.load(run, mask_seed=...)`` runs the
same masks in PyTorch, so both give the same actions and probabilities.

**Exporter.** ``exporter="auto"`` (default) runs ``torch.onnx.export`` with ``dynamo=False`` (the
TorchScript tracer; needs the ``onnx`` package), which exports the UNets, timm/smp models and most
policies in seconds, offline, and falls back to the ``torch.export``-based exporter (``dynamo``;
needs ``onnxscript``, several times slower) for a graph the tracer cannot export, such as the
battery policy's adaptive pooling to a grid that does not divide its feature map. Opset `OPSET` unless told otherwise. Every graph
is checked with ``onnx.checker`` and run with onnxruntime on a random batch of another batch size
than it was traced with, against PyTorch.

Example:
    >>> result = export_onnx("runs/battery", "runs/battery/export")  # doctest: +SKIP
    >>> from routerkit.deploy import OnnxPipeline  # doctest: +SKIP
    >>> OnnxPipeline(result.manifest_path).predict(batch).actions  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routerkit._io import atomic_write_json
from routerkit.deploy.masks import FixedMaskDropout
from routerkit.deploy.model import RoutedModel
from routerkit.functional import entropy, unit_mean, unit_mean_probs
from routerkit.partitioners import PatchGrid, WholeInput
from routerkit.routers.base import Router
from routerkit.routers.baselines import RandomRouter, SingleModelRouter
from routerkit.routers.cascades import IDKCascade, OptimalStoppingCascade
from routerkit.routers.paser import PaSeRRouter
from routerkit.uncertainty import BaseOutput
from routerkit.uncertainty.estimators import MaxProbability, MCDropoutEntropy, SoftmaxEntropy, SoftmaxMargin, _dropouts

__all__ = [
    "DEPLOY_EXTRA",
    "EXPORTERS",
    "EXPORTABLE_ROUTERS",
    "FORMAT_VERSION",
    "MANIFEST",
    "OPSET",
    "ExportError",
    "ExportResult",
    "export_model",
    "export_onnx",
    "export_problem",
    "manifest_of",
]

#: Default ONNX opset of the graphs.
OPSET = 18
#: Version of the bundle layout (``manifest.json`` ``format_version``).
FORMAT_VERSION = 1
#: The bundle's manifest file name.
MANIFEST = "manifest.json"
#: ``torch.onnx.export`` front ends: the TorchScript tracer (``dynamo=False``) or ``torch.export``.
EXPORTERS = ("auto", "torchscript", "dynamo")
_EXPORTER_NAMES = {"torchscript": "dynamo=False, TorchScript", "dynamo": "dynamo=True"}
#: How to install what export and `OnnxPipeline` need.
DEPLOY_EXTRA = "pip install 'routerkit[deploy]'"
#: Routers with a traceable decision, by class, and how they decide (``pick_first`` or ``cascade``).
EXPORTABLE_ROUTERS: dict[type[Router], str] = {
    PaSeRRouter: "pick_first",
    SingleModelRouter: "pick_first",
    IDKCascade: "cascade",
    OptimalStoppingCascade: "cascade",
}
_SINGLE_PASS = (SoftmaxEntropy, MaxProbability, SoftmaxMargin)
_EDGE_FILE = "edge.onnx"


class ExportError(ValueError):
    """A run, router or graph that cannot be exported (the message says which and why)."""


@dataclass
class ExportResult:
    """What `export_onnx` wrote.

    Attributes:
        out_dir: The bundle folder.
        manifest_path: Its ``manifest.json``.
        manifest: The manifest's content.
        files: Every file written (graphs, then the manifest).
    """

    out_dir: Path
    manifest_path: Path
    manifest: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def _require(module: str, why: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{why} needs the {module!r} package: {DEPLOY_EXTRA}.") from None


def export_problem(router: Router, estimator: object, partitioner: object) -> str | None:
    """Why a router, estimator and partitioner cannot be exported, or ``None`` if they can.

    Exported are the routers of `EXPORTABLE_ROUTERS` (by exact class: a subclass may decide
    differently), the estimators ``mc_dropout``, ``softmax_entropy``, ``max_prob`` and ``margin``,
    and the ``patch_grid`` and ``whole_input`` partitioners.
    """
    name = type(router).__name__
    if router.needs_targets:
        return f"the router {name} decides from the labels (an evaluation tool): there are none on a device."
    if type(router) not in EXPORTABLE_ROUTERS:
        known = ", ".join(sorted(c.__name__ for c in EXPORTABLE_ROUTERS))
        why = (
            "its decisions are draws from torch's random generator, which an ONNX runtime cannot repeat"
            if isinstance(router, RandomRouter)
            else "routerkit only exports routers whose decisions it knows to be traceable"
        )
        return f"the router {name} cannot be exported: {why}. Exportable routers: {known}."
    if router.uses_base and type(estimator) not in (MCDropoutEntropy, *_SINGLE_PASS):
        return (
            f"the uncertainty estimator {type(estimator).__name__} cannot be exported: exportable are "
            "mc_dropout, softmax_entropy, max_prob and margin."
        )
    if type(partitioner) not in (PatchGrid, WholeInput):
        return f"the partitioner {type(partitioner).__name__} cannot be exported: exportable are patch_grid and whole_input."
    return None


# ----------------------------------------------------------------------------- graphs


def _state_kind(model: RoutedModel) -> str:
    """How ``f_0``'s state is computed for the model's router: ``none``, ``single_pass``, ``mc_dropout`` or ``estimator``."""
    pipe, router = model.pipeline, model.router
    if pipe.base_passes(router) == 0:
        return "none"  # f_0 does not run
    if not router.uses_uncertainty:
        return "single_pass"  # one deterministic softmax (RoutedPipeline.base_output)
    return "mc_dropout" if isinstance(pipe.estimator, MCDropoutEntropy) else "estimator"


class _State(nn.Module):
    """``f_0``'s state as the pipeline computes it for ``router``: ``x -> (probs, uncertainty)``."""

    def __init__(self, model: RoutedModel) -> None:
        super().__init__()
        pipe = model.pipeline
        estimator = pipe.estimator
        self.kind = _state_kind(model)
        #: What runs f_0 for the single-pass kinds (the config's estimator, or a plain softmax).
        self.estimator = estimator if self.kind == "estimator" else SoftmaxEntropy()
        self.base = copy.deepcopy(pipe.zoo.base).eval()
        self.num_passes = int(getattr(estimator, "num_passes", 1)) if self.kind == "mc_dropout" else 1
        self.shared_trunk = False
        if self.kind == "mc_dropout":
            fixed = [m for m in self.base.modules() if isinstance(m, FixedMaskDropout)]
            if not fixed or len(fixed) != len(_dropouts(self.base)):
                raise ExportError(
                    "f_0's MC-dropout masks are not fixed: load the run with routerkit.load(run, mask_seed=0) "
                    "(export_onnx does), so that the exported state is deterministic."
                )
            for m in fixed:
                m.forced = True
            x = torch.zeros((1, *pipe.input_shape))
            assert isinstance(estimator, MCDropoutEntropy)
            self.shared_trunk = estimator._shares_trunk(pipe.zoo.base, x, _dropouts(pipe.zoo.base))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "none":  # f_0 is not needed (a single costlier model): the pipeline's placeholder
            zeros = torch.zeros_like(x[:, :1])
            return zeros, zeros[:, 0]
        if self.kind != "mc_dropout":
            out = self.estimator._estimate(self.base, x)  # type: ignore[attr-defined]
            return out.probs, out.uncertainty
        n = self.num_passes
        source = self.base.forward_features(x) if self.shared_trunk else x  # type: ignore[operator]
        run: Callable[[Tensor], Tensor] = self.base.forward_head if self.shared_trunk else self.base  # type: ignore[assignment]
        logits = run(torch.cat([source] * n))  # pass-major, as MCDropoutEntropy._passes
        probs = torch.softmax(logits.float(), dim=1)
        mean = probs.reshape(n, -1, *probs.shape[1:]).mean(0)
        return mean, entropy(mean, dim=1)


def _unit_means(t: Tensor, rows: int, cols: int, channels: int) -> Tensor:
    """`PatchGrid.split` of ``t [B, C, H, W]`` (a batch of any size) then the mean over each unit: ``[B * P, C]``."""
    if t.dim() == 2:  # a vector state [B, K]: one unit per input
        return t
    height, width = t.shape[-2], t.shape[-1]
    h, w = int(height) // rows, int(width) // cols
    units = t.reshape(-1, channels, rows, h, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, h, w)
    return unit_mean_probs(units)


class _Edge(nn.Module):
    """The edge graph: ``x -> (actions [B, P], probs, uncertainty)``."""

    def __init__(self, model: RoutedModel) -> None:
        super().__init__()
        self.state = _State(model)
        self.router = copy.deepcopy(model.router).eval()
        self.kind = EXPORTABLE_ROUTERS[type(model.router)]
        self.rows, self.cols = model.pipeline.partitioner.grid_shape
        self.num_units = self.rows * self.cols

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs, unc = self.state(x)
        if self.kind == "cascade":
            unit_probs = _unit_means(probs, self.rows, self.cols, probs.shape[1])
            unit_unc = _unit_means(unc.unsqueeze(1), self.rows, self.cols, 1).squeeze(1) if unc.dim() > 1 else unc
            stop = self.router.stop(0, unit_probs, unit_mean(unit_unc))
            actions = torch.logical_not(stop).long().reshape(-1, self.num_units)
        elif isinstance(self.router, SingleModelRouter):
            zeros = torch.zeros_like(x.flatten(1)[:, :1], dtype=torch.long)
            actions = zeros.repeat(1, self.num_units) + self.router.index
        else:
            actions = self.router._route(BaseOutput(probs, unc, x), True, None).long()
        return actions, probs, unc


class _Unit(nn.Module):
    """One costlier model on units: ``units -> probs`` (widened by the halo), and a cascade stage's ``stop``."""

    def __init__(self, model: nn.Module, halo: int, router: Router | None = None, stage: int | None = None) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.halo = halo
        self.router = copy.deepcopy(router).eval() if router is not None else None
        self.stage = stage

    def forward(self, units: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        probs = torch.softmax(self.model(units).float(), dim=1)
        if self.router is None or self.stage is None:
            return probs
        a = self.halo
        cropped = probs[..., a:-a, a:-a] if a else probs
        stop = self.router.stop(self.stage, unit_mean_probs(cropped), unit_mean(entropy(cropped)))
        return probs, stop


# ----------------------------------------------------------------------------- exporting


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' notices (the TorchScript exporter's deprecation, tracer warnings, dynamo's progress lines)."""
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_graph(
    module: nn.Module, example: Tensor, file: Path, input_name: str, outputs: list[str], opset: int, exporter: str
) -> str:
    """``torch.onnx.export`` of ``module`` on ``example`` with a dynamic first dimension of every input and output.

    ``exporter="auto"`` tries the TorchScript exporter first and the dynamo one where it fails (e.g. an
    adaptive pooling whose output size does not divide its input's). Returns the exporter that wrote the file.
    """
    if exporter == "auto":
        try:
            return _export_graph(module, example, file, input_name, outputs, opset, "torchscript")
        except ExportError as first:
            try:
                return _export_graph(module, example, file, input_name, outputs, opset, "dynamo")
            except (ExportError, ImportError) as second:
                raise ExportError(f"{first}; the dynamo exporter failed too: {second}") from None
    _require("onnx", "ONNX export")
    module.eval()
    try:
        with _quiet(), torch.no_grad():
            if exporter == "dynamo":
                _require("onnxscript", "The dynamo ONNX exporter")
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(
                    module,
                    (example,),
                    str(file),
                    input_names=[input_name],
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    verbose=False,
                )
            else:
                axes = {name: {0: "batch"} for name in (input_name, *outputs)}
                torch.onnx.export(
                    module,
                    (example,),
                    str(file),
                    input_names=[input_name],
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=False,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
    except ImportError:
        raise
    except Exception as err:
        raise ExportError(f"torch.onnx.export ({exporter}) failed on {file.name}: {type(err).__name__}: {err}") from None
    onnx = _require("onnx", "ONNX export")
    try:
        onnx.checker.check_model(str(file))
    except Exception as err:
        raise ExportError(f"{file}: the exported graph does not pass onnx.checker: {err}") from None
    return exporter


def _session(file: Path) -> Any:
    ort = _require("onnxruntime", "Validating an ONNX export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


def _compare(module: nn.Module, file: Path, x: Tensor, input_name: str, outputs: list[str]) -> dict[str, float]:
    """Max abs difference of each output of ``file`` under onnxruntime and of ``module`` in PyTorch on ``x``."""
    with torch.no_grad():
        expected = module(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = _session(file).run(outputs, {input_name: x.numpy()})
    diffs: dict[str, float] = {}
    for name, want, have in zip(outputs, expected, got, strict=True):
        want_np = want.numpy()
        if tuple(have.shape) != tuple(want_np.shape):
            raise ExportError(
                f"{file}: output {name!r} has shape {list(have.shape)} under onnxruntime, expected {list(want_np.shape)}."
            )
        if want_np.dtype.kind in "biu":
            diffs[f"{name}_mismatches"] = int((have != want_np).sum())
        else:
            diffs[name] = float(np.abs(have.astype(np.float64) - want_np.astype(np.float64)).max()) if want_np.size else 0.0
    return diffs


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routerkit")
    except PackageNotFoundError:
        return "unknown"


def export_model(
    model: RoutedModel,
    out: str | Path,
    opset: int = OPSET,
    exporter: str = "auto",
    atol: float = 1e-4,
    source: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a `RoutedModel` (loaded with a ``mask_seed`` when its state is MC dropout) as an ONNX bundle.

    Args:
        model: The routed model (moved to the CPU for the export).
        out: The bundle folder (created; files of an earlier export there are replaced).
        opset: ONNX opset of every graph.
        exporter: ``"auto"`` (TorchScript, dynamo where it fails), ``"torchscript"`` (``dynamo=False``) or
            ``"dynamo"`` (`EXPORTERS`).
        atol: Largest max abs difference of a probability output allowed between onnxruntime and
            PyTorch on the random validation batch.
        source: Where the model came from (run directory, checkpoint), written into the manifest.

    Returns:
        The `ExportResult`.

    Raises:
        ExportError: The router, estimator or partitioner cannot be exported, the masks are not
            fixed, an exporter failed, or a graph is further than ``atol`` from PyTorch.
        ImportError: ``onnx`` / ``onnxruntime`` (or ``onnxscript`` for the dynamo exporter) are missing.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"Expected exporter to be one of {list(EXPORTERS)} but got {exporter!r}.")
    pipe, router = model.pipeline, model.router
    problem = export_problem(router, pipe.estimator, pipe.partitioner)
    if problem is not None:
        raise ExportError(f"Cannot export: {problem}")
    _require("onnx", "ONNX export")
    _require("onnxruntime", "Validating an ONNX export")
    model.to("cpu")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    kind = EXPORTABLE_ROUTERS[type(router)]
    part = pipe.partitioner
    halo = part.halo
    gen = torch.Generator().manual_seed(0)
    files: list[Path] = []

    edge = _Edge(model).eval()
    edge_file = folder / _EDGE_FILE
    edge_outputs = ["actions", "probs", "uncertainty"]
    used = [
        _export_graph(edge, torch.randn((2, *pipe.input_shape), generator=gen), edge_file, "x", edge_outputs, opset, exporter)
    ]
    check = torch.randn((3, *pipe.input_shape), generator=gen)
    edge_diff = _compare(edge, edge_file, check, "x", edge_outputs)
    base = pipe.base_output(check, router)  # the wrapper against the pipeline itself
    with torch.no_grad():
        actions, probs, _ = edge(check)
    edge_diff["probs_vs_pipeline"] = float((probs - base.probs.float()).abs().max())
    if kind == "pick_first":
        edge_diff["actions_vs_pipeline_mismatches"] = int((actions != router.route(base, greedy=True)).sum())
    files.append(edge_file)
    _check_diff(edge_file, edge_diff, atol)

    num_models = len(pipe.zoo)
    unit_flops = pipe.accountant.unit_flops
    decision_flops = [*router.decision_flops(), 0] if kind == "cascade" else [0] * num_models
    costs = [float(c) for c in pipe.costs.tolist()]
    entries: list[dict[str, Any]] = [
        {
            "index": 0,
            "name": pipe.zoo.names[0],
            "file": None,
            "answered_by": _EDGE_FILE,
            "cost": costs[0],
            "unit_gflops": unit_flops[0] / 1e9,
        }
    ]
    for i in range(1, num_models):
        stage = i if kind == "cascade" and i < num_models - 1 else None
        unit = _Unit(pipe.zoo[i], halo, router if stage is not None else None, stage).eval()
        outputs = ["probs", "stop"] if stage is not None else ["probs"]
        file = folder / f"{i}_{_safe(pipe.zoo.names[i])}.onnx"
        used.append(
            _export_graph(unit, torch.randn((2, *pipe.model_unit_shape), generator=gen), file, "units", outputs, opset, exporter)
        )
        diff = _compare(unit, file, torch.randn((3, *pipe.model_unit_shape), generator=gen), "units", outputs)
        _check_diff(file, diff, atol)
        files.append(file)
        entries.append(
            {
                "index": i,
                "name": pipe.zoo.names[i],
                "file": file.name,
                "sha256": _sha256(file),
                "inputs": {"units": ["units", *pipe.model_unit_shape]},
                "outputs": outputs,
                "cost": costs[i],
                "unit_gflops": unit_flops[i] / 1e9,
                "stop_gflops": decision_flops[i] / 1e9 if kind == "cascade" else 0.0,
                "max_abs_diff": diff,
            }
        )
    manifest: dict[str, Any] = {
        "format": "routerkit-onnx",
        "format_version": FORMAT_VERSION,
        "onnx_opset": opset,
        "exporter": ", ".join(
            f"torch.onnx.export ({'dynamo=True' if name == 'dynamo' else 'dynamo=False, TorchScript'})"
            for name in sorted(set(used))
        ),
        **manifest_of(model, source),
        "edge": {
            "file": _EDGE_FILE,
            "sha256": _sha256(edge_file),
            "inputs": {"x": ["batch", *pipe.input_shape]},
            "outputs": edge_outputs,
            "actions": "chosen model per unit" if kind == "pick_first" else "stage-0 decision: 0 = f_0 answers, 1 = go on to f_1",
            "max_abs_diff": edge_diff,
        },
        "models": entries,
        "validation": {"atol": atol, "batch": 3, "traced_batch": 2, "inputs": "standard normal, seed 0"},
    }
    path = folder / MANIFEST
    atomic_write_json(path, manifest)
    files.append(path)
    return ExportResult(folder, path, manifest, files)


def manifest_of(model: RoutedModel, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest fields that describe a routed model itself, without exporting a graph.

    What a bundle's ``manifest.json`` says about the run (`export_model` writes these fields and
    adds the graphs', ``format``, ``edge``, the files of ``models`` and ``validation``); ``routerkit
    serve``'s ``GET /v1/info`` answers with them too. Works for every router that decides without
    labels, exportable or not (``router.kind`` is then ``cascade`` or ``pick_first`` by the router's
    ``is_cascade``); ``state.masks`` is ``fixed`` when ``f_0``'s MC-dropout masks are
    (``routerkit.load(..., mask_seed=...)``), else ``per batch``.

    Args:
        model: The routed model.
        source: Where the model came from (run directory, checkpoint).

    Returns:
        ``routerkit_version``, ``torch_version``, ``source``, ``task``, the input and unit shapes,
        ``partitioner``, the classes, ``normalisation``, ``mask_values``, ``router``, ``state``,
        ``models`` (index, name, cost and GFLOPs on one unit per model), ``gflops`` (state, policy,
        per unit, stop decisions) and ``flop_convention``.
    """
    pipe, router, spec = model.pipeline, model.router, model.spec
    part = pipe.partitioner
    kind = EXPORTABLE_ROUTERS.get(type(router), "cascade" if router.is_cascade else "pick_first")
    unit_flops = pipe.accountant.unit_flops
    decision_flops = [*router.decision_flops(), 0] if kind == "cascade" else [0] * len(pipe.zoo)
    costs = [float(c) for c in pipe.costs.tolist()]
    zero_base = pipe.base_output(torch.zeros((1, *pipe.input_shape), device=model.device), router)
    estimator = pipe.estimator
    state_kind = _state_kind(model)
    num_passes = int(getattr(estimator, "num_passes", 1)) if state_kind == "mc_dropout" else 1
    shared_trunk = False
    if state_kind == "mc_dropout":
        assert isinstance(estimator, MCDropoutEntropy)
        x = torch.zeros((1, *pipe.input_shape), device=model.device)
        shared_trunk = bool(estimator._shares_trunk(pipe.zoo.base, x, _dropouts(pipe.zoo.base)))
    fixed = any(isinstance(m, FixedMaskDropout) for m in pipe.zoo.base.modules())
    fmt = spec.file_format
    models = [
        {"index": i, "name": name, "cost": costs[i], "unit_gflops": unit_flops[i] / 1e9, "stop_gflops": decision_flops[i] / 1e9}
        for i, name in enumerate(pipe.zoo.names)
    ]
    return {
        "routerkit_version": _version(),
        "torch_version": torch.__version__,
        "source": dict(source or {}),
        "task": spec.task,
        "input_shape": list(pipe.input_shape),
        "unit_shape": list(pipe.unit_shape),
        "model_unit_shape": list(pipe.model_unit_shape),
        "partitioner": {
            "name": "patch_grid" if isinstance(part, PatchGrid) else "whole_input",
            "grid": list(part.grid_shape),
            "num_units": part.num_units,
            "halo": part.halo,
            "halo_padding": "reflect",
        },
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "ignore_index": spec.ignore_index,
        "normalisation": {"scale": fmt.scale, "mean": _list(fmt.mean), "std": _list(fmt.std)},
        "mask_values": {str(k): v for k, v in fmt.mask_values.items()} if fmt.mask_values is not None else None,
        "router": {
            "name": type(router).__name__,
            "kind": kind,
            "uses_base": router.uses_base,
            "uses_uncertainty": router.uses_uncertainty,
        },
        "state": {
            "kind": state_kind,
            "estimator": type(estimator).__name__ if state_kind != "none" else None,
            "num_passes": num_passes,
            "shared_trunk": shared_trunk,
            "masks": ("fixed" if fixed else "per batch") if state_kind == "mc_dropout" else None,
            "mask_seed": model.mask_seed if state_kind == "mc_dropout" else None,
        },
        "models": models,
        "gflops": {
            "state": pipe.base_flops(router) / 1e9,
            "policy": pipe.policy_flops(router, zero_base) / 1e9,
            "unit": [f / 1e9 for f in unit_flops],
            "stop": [f / 1e9 for f in decision_flops],
        },
        "flop_convention": _flop_convention(),
    }


def _check_diff(file: Path, diffs: dict[str, float], atol: float) -> None:
    for name, value in diffs.items():
        if name.endswith("mismatches"):
            continue
        if not value <= atol:  # NaN fails too
            raise ExportError(
                f"{file}: output {name!r} is {value:.3g} away from PyTorch under onnxruntime (expected at most {atol:g}); "
                "try --exporter dynamo or another --opset."
            )


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return list(values) if values is not None else None


def _flop_convention() -> str:
    from routerkit.flops import FLOP_CONVENTION

    return str(FLOP_CONVENTION)


def export_onnx(
    run_dir: str | Path,
    out: str | Path | None = None,
    checkpoint: str | None = None,
    mask_seed: int = 0,
    opset: int = OPSET,
    exporter: str = "auto",
    trust_remote_code: bool = False,
    atol: float = 1e-4,
) -> ExportResult:
    """Export a trained run directory as an ONNX bundle (`export_model` on ``routerkit.load(run_dir, mask_seed=...)``).

    Args:
        run_dir: The run directory.
        out: The bundle folder (default: ``RUN_DIR/export/onnx``).
        checkpoint: Checkpoint name (default: ``final``, else the latest).
        mask_seed: Seed of the fixed MC-dropout masks baked into the edge graph (`routerkit.deploy.masks`).
        opset: ONNX opset.
        exporter: ``"auto"``, ``"torchscript"`` or ``"dynamo"``.
        trust_remote_code: Import the plugin code the run names even if it comes from elsewhere.
        atol: Largest difference to PyTorch allowed on the validation batch.

    Returns:
        The `ExportResult`.

    Raises:
        ConfigError: Not a run directory, an unknown checkpoint, a config that does not build, or
            an untrusted run (`UntrustedRunError`).
        CheckpointError: The weights do not fit the models.
        ExportError: What `export_model` raises.
        ImportError: The ``deploy`` extra is not installed.
    """
    from routerkit.training.run_dir import load_routing

    path = Path(run_dir)
    _require("onnx", "routerkit export")
    _require("onnxruntime", "routerkit export")
    parts = load_routing(path, checkpoint, trust_remote_code, "cpu")
    problem = export_problem(parts.router, parts.pipeline.estimator, parts.pipeline.partitioner)
    if problem is not None:
        raise ExportError(f"Cannot export {path}: {problem}")
    model = RoutedModel(parts.pipeline, parts.router, parts.spec, mask_seed=mask_seed)
    source = {"run_dir": str(path.resolve()), "checkpoint": Path(parts.checkpoint).stem}
    return export_model(model, Path(out) if out is not None else path / "export" / "onnx", opset, exporter, atol, source)
