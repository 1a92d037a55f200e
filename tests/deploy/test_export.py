"""``routerkit export --format onnx`` and `OnnxPipeline`: the bundle routes as `RoutedModel` does.

One tiny trained battery run (PaSeR) is exported through the command line; the other runs are
built without training (config + random weights + checkpoint), which is all an export needs:
an IDK cascade with a halo, an optimal-stopping cascade and a classification run (CIFAR ResNets,
an MLP policy). Each bundle is run with onnxruntime and compared with ``routerkit.load(run,
mask_seed=0)``: the same actions and probabilities within 1e-4.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_battery
from typer.testing import CliRunner

from routerkit.cli import app
from routerkit.config import load_config
from routerkit.config.build import build_routing
from routerkit.data.spec import DataSpec, FileFormat
from routerkit.deploy import ExportError, OnnxPipeline, RoutedModel, export_onnx, load
from routerkit.functional import unit_mean
from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router
from routerkit.training.checkpoint import load_checkpoint, save_checkpoint
from routerkit.training.run_dir import write_run_files

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BATTERY = EXAMPLES / "battery.yaml"
CIFAR = EXAMPLES / "cifar.yaml"
TINY = [*tiny_battery(), "run.threads=1"]
runner = CliRunner()
BATTERY_SPEC = DataSpec(
    (1, 32, 32), ["pore", "carbon", "nickel"], None, "segmentation", FileFormat(mask_values={0: 0, 1: 255, 2: 128})
)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import routerkit.cli

    monkeypatch.setattr(routerkit.cli, "console", Console(width=200))


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("-s", item)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny battery run of tests/test_cli.py, trained (one epoch a stage)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *_sets(TINY)])
    assert result.exit_code == 0, result.output
    return run_dir


def _built_run(
    path: Path,
    config: Path,
    overrides: list[str],
    spec: DataSpec,
    prepare: Callable[[RoutedPipeline, Router], None] | None = None,
) -> Path:
    """A run directory with random weights: what ``routerkit train`` writes first, and a ``final`` checkpoint."""
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    pipeline, router = build_routing(cfg, spec)
    pipeline.zoo.eval()
    router.eval()
    if prepare is not None:
        prepare(pipeline, router)
    write_run_files(path, cfg, [str(config.parent.resolve())], spec)
    state = {"model": {"zoo": pipeline.zoo.state_dict(), "router": router.state_dict()}}
    save_checkpoint(path, "final", state, {"stage": "final", "stage_index": 0, "epoch": -1, "stage_complete": True})
    return path


def _inputs(shape: tuple[int, ...], n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _same_routing(run_dir: Path, bundle: Path, x: torch.Tensor) -> tuple[np.ndarray, RoutedModel, OnnxPipeline]:
    """``RoutedModel.predict`` (fixed masks, seed 0) against `OnnxPipeline.predict`: the actions, probabilities and GFLOPs."""
    model = load(run_dir, mask_seed=0)
    edge = OnnxPipeline(bundle / "manifest.json", threads=1)
    want = model.predict(x, batch_size=4, probs=True)
    got = edge.predict(x.numpy(), batch_size=3, probs=True)
    assert isinstance(want.probs, torch.Tensor) and isinstance(want.actions, torch.Tensor) and got.probs is not None
    np.testing.assert_array_equal(got.actions, want.actions.numpy())
    assert got.probs.shape == tuple(want.probs.shape)
    assert float(np.abs(got.probs - want.probs.numpy()).max()) <= 1e-4
    np.testing.assert_array_equal(got.pred, torch.as_tensor(want.pred).numpy())
    np.testing.assert_allclose(got.gflops, want.gflops.numpy(), rtol=1e-9)
    assert got.model_names == want.model_names and got.class_names == want.class_names
    return got.actions, model, edge


def _calibrated_copy(run_dir: Path, x: torch.Tensor) -> None:
    """A ``mixed`` checkpoint of the tiny run whose PaSeR logit bias sends units to every model (the trained one picks one)."""
    model = load(run_dir, mask_seed=0)
    with torch.no_grad():
        base = model.pipeline.base_output(x, model.router)
        logits = model.router.logits(base)  # type: ignore[operator]
    state, _ = load_checkpoint(run_dir, "final")
    state["model"]["router"]["logit_bias"] = -logits.median(0).values.median(0).values
    save_checkpoint(run_dir, "mixed", state, {"stage": "mixed"}, update_latest=False)


def test_export_tiny_battery_run_matches_routed_model(tiny_run: Path, tmp_path: Path) -> None:
    x = _inputs(BATTERY_SPEC.input_shape)
    _calibrated_copy(tiny_run, x)
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["export", str(tiny_run), "--format", "onnx", "--out", str(out), "--checkpoint", "mixed"])
    assert result.exit_code == 0, result.output
    assert "edge.onnx" in result.output and "masks fixed with seed 0" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "routerkit-onnx" and manifest["onnx_opset"] == 18
    assert manifest["source"]["checkpoint"] == "mixed"
    assert [m["name"] for m in manifest["models"]] == ["f0_small", "f1_medium", "f2_large"]
    assert manifest["models"][0]["file"] is None and all((out / m["file"]).is_file() for m in manifest["models"][1:])
    assert manifest["input_shape"] == [1, 32, 32] and manifest["unit_shape"] == [1, 8, 8]
    assert manifest["partitioner"] == {
        "name": "patch_grid",
        "grid": [4, 4],
        "num_units": 16,
        "halo": 0,
        "halo_padding": "reflect",
    }
    assert manifest["class_names"] == ["pore", "carbon", "nickel"] and manifest["mask_values"] == {"0": 0, "1": 255, "2": 128}
    assert manifest["normalisation"] == {"scale": "auto", "mean": None, "std": None}
    assert "multiply-add" in manifest["flop_convention"] and manifest["routerkit_version"]
    assert manifest["router"]["kind"] == "pick_first"
    assert manifest["state"] == {
        "kind": "mc_dropout",
        "estimator": "MCDropoutEntropy",
        "num_passes": 2,
        "shared_trunk": True,
        "masks": "fixed",
        "mask_seed": 0,
    }
    costs = [m["cost"] for m in manifest["models"]]
    assert costs == sorted(costs) and manifest["gflops"]["state"] > 0 and manifest["gflops"]["policy"] > 0
    assert all(m["max_abs_diff"]["probs"] < 1e-4 for m in manifest["models"][1:])
    assert manifest["edge"]["max_abs_diff"]["probs"] < 1e-4
    model = load(tiny_run, checkpoint="mixed", mask_seed=0)
    edge = OnnxPipeline(out, threads=1)
    want = model.predict(x, probs=True)
    got = edge.predict(x.numpy(), probs=True)
    np.testing.assert_array_equal(got.actions, want.actions.numpy())  # type: ignore[union-attr]
    assert float(np.abs(got.probs - want.probs.numpy()).max()) <= 1e-4  # type: ignore[operator, union-attr]
    assert len(np.unique(got.actions)) == 3  # every model of the zoo answered some unit
    np.testing.assert_allclose(got.gflops, want.gflops.numpy(), rtol=1e-9)
    assert got.routing_map is not None and got.routing_map.shape == (6, 4, 4)
    assert edge.mask_image(got.pred).dtype == np.uint8 and set(np.unique(edge.mask_image(got.pred))) <= {0, 128, 255}
    with pytest.raises(ValueError, match=r"trained shape"):
        edge.predict(np.zeros((1, 1, 16, 16), np.float32))


def _idk_thresholds(pipeline: RoutedPipeline, router: Router) -> None:
    """IDK thresholds at the median unit uncertainty of each stage on random inputs: units stop at every stage."""
    x = _inputs(pipeline.input_shape, 8, seed=5)
    base = pipeline.estimator(pipeline.zoo.base, x)
    part = pipeline.partitioner
    t0 = unit_mean(part.split(base.uncertainty.unsqueeze(1)).squeeze(1)).median()
    with torch.no_grad():
        probs = torch.softmax(pipeline.executor.forward(pipeline.zoo[1], part.split_inputs(x)), 1)
    t1 = unit_mean(-(probs * probs.clamp_min(1e-12).log()).sum(1)).median()
    router.set_thresholds([float(t0), float(t1)])  # type: ignore[operator]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_idk_cascade_with_a_halo_exports_and_matches(tmp_path: Path, exporter: str) -> None:
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    overrides = [*TINY, "router.name=idk", "router.params={}", "partitioner.params.halo=2"]
    overrides += ["uncertainty.params.share_trunk=false", "zoo.models.0.params.dropout_at=both"]  # N full passes, 2 dropouts
    run_dir = _built_run(tmp_path / "idk", BATTERY, overrides, BATTERY_SPEC, _idk_thresholds)
    result = export_onnx(run_dir, tmp_path / "bundle", exporter=exporter)
    manifest = result.manifest
    assert manifest["router"]["kind"] == "cascade" and manifest["partitioner"]["halo"] == 2
    assert manifest["state"]["shared_trunk"] is False and manifest["exporter"].endswith("dynamo=True)") == (exporter == "dynamo")
    assert manifest["model_unit_shape"] == [1, 12, 12] and manifest["unit_shape"] == [1, 8, 8]
    assert manifest["models"][1]["outputs"] == ["probs", "stop"] and manifest["models"][2]["outputs"] == ["probs"]
    actions, _, edge = _same_routing(run_dir, result.out_dir, _inputs(BATTERY_SPEC.input_shape))
    assert len(np.unique(actions)) == 3  # units stopped at f_0, at f_1 and went on to f_2
    x = _inputs(BATTERY_SPEC.input_shape, 2).numpy()
    part = load(run_dir, mask_seed=0).pipeline.partitioner
    np.testing.assert_array_equal(edge.split_inputs(x), part.split_inputs(torch.from_numpy(x)).numpy())


def _stop_bias(pipeline: RoutedPipeline, router: Router) -> None:
    """A stop bias at minus the median stage-0 stop logit of the test inputs (random policies stop all units or none)."""
    spec = DataSpec(pipeline.input_shape, [str(k) for k in range(10)], None, "classification")
    model = RoutedModel(pipeline, router, spec, mask_seed=0)  # the state the test routes with
    with torch.no_grad():
        base = model.pipeline.base_output(_inputs(pipeline.input_shape, 8), model.router)
        logits = router.stop_logits(0, base.probs, base.uncertainty)  # type: ignore[operator]
    router.stop_bias.fill_(-float(logits.median()))  # type: ignore[operator]


def _logit_bias(pipeline: RoutedPipeline, router: Router) -> None:
    """A PaSeR logit bias at minus the median logit of each action (a random policy otherwise picks one model)."""
    x = _inputs(pipeline.input_shape, 16, seed=5)
    with torch.no_grad():
        logits = router.logits(pipeline.base_output(x, router))  # type: ignore[operator]
    router.logit_bias.copy_(-logits.flatten(0, 1).median(0).values)  # type: ignore[operator]


@pytest.fixture(scope="module")
def cifar_spec() -> DataSpec:
    sys.path.insert(0, str(EXAMPLES))
    from cifar_plugin import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES

    return DataSpec((3, 32, 32), list(CLASS_NAMES), None, "classification", FileFormat(mean=CIFAR10_MEAN, std=CIFAR10_STD))


@pytest.mark.parametrize("router", ["paser", "optimal_stopping"])
def test_classification_run_exports_and_matches(tmp_path: Path, cifar_spec: DataSpec, router: str) -> None:
    overrides = [f"zoo.models.{i}.model=cifar_resnet" for i in range(3)]
    overrides += [f"zoo.models.{i}.params.depth=8" for i in range(3)]
    overrides += [f"zoo.models.{i}.params.width={w}" for i, w in enumerate((2, 4, 6))]
    overrides += [f"zoo.models.{i}.weights=null" for i in range(3)]  # narrower ResNets than the shipped zoo's
    overrides += ["uncertainty.params.num_passes=3", f"router.name={router}"]
    overrides += ["router.params={width: 2}"] if router == "paser" else ["router.params={}"]
    prepare = _stop_bias if router == "optimal_stopping" else _logit_bias
    run_dir = _built_run(tmp_path / router, CIFAR, overrides, cifar_spec, prepare)
    result = export_onnx(run_dir, tmp_path / "bundle")
    manifest = result.manifest
    assert manifest["task"] == "classification" and manifest["partitioner"]["name"] == "whole_input"
    assert manifest["state"]["shared_trunk"] and manifest["state"]["num_passes"] == 3
    assert manifest["normalisation"]["mean"] == pytest.approx(list(cifar_spec.file_format.mean or ()))
    actions, _, edge = _same_routing(run_dir, result.out_dir, _inputs(cifar_spec.input_shape, 8))
    assert actions.shape == (8, 1) and len(np.unique(actions)) >= 2
    pixels = np.full((3, 32, 32), 255, np.uint8)
    expected = (1.0 - np.asarray(cifar_spec.file_format.mean)) / np.asarray(cifar_spec.file_format.std)
    np.testing.assert_allclose(edge.preprocess(pixels)[:, 0, 0], expected, rtol=1e-6)


def test_a_single_model_router_exports_without_running_f0(tmp_path: Path) -> None:
    overrides = [*TINY, "router.name=single", "router.params={index: 2}"]
    run_dir = _built_run(tmp_path / "single", BATTERY, overrides, BATTERY_SPEC)
    result = export_onnx(run_dir, tmp_path / "bundle")
    assert result.manifest["state"]["kind"] == "none" and result.manifest["gflops"]["state"] == 0
    actions, _, _ = _same_routing(run_dir, result.out_dir, _inputs(BATTERY_SPEC.input_shape, 3))
    assert (actions == 2).all()


def test_routers_that_cannot_be_exported_are_refused_clearly(tmp_path: Path) -> None:
    run_dir = _built_run(tmp_path / "random", BATTERY, [*TINY, "router.name=random", "router.params={}"], BATTERY_SPEC)
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 2, result.output
    assert "RandomRouter cannot be exported" in result.output and "random generator" in result.output
    assert "Exportable routers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bundle").exists()
    bad = runner.invoke(app, ["export", str(run_dir), "--format", "tflite"])
    assert bad.exit_code == 2 and "--format must be 'onnx'" in bad.output


def test_missing_and_untrusted_runs_give_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["export", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a run directory" in missing.output and "Traceback" not in missing.output
    copied = tmp_path / "copied"
    shutil.copytree(tiny_run, copied)  # moved elsewhere: no longer the run this user trained here
    untrusted = runner.invoke(app, ["export", str(copied)])
    assert untrusted.exit_code == 2 and "--trust-remote-code" in untrusted.output and "Traceback" not in untrusted.output
    assert not (copied / "export").exists()
    with pytest.raises(FileNotFoundError, match="manifest"):
        OnnxPipeline(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "routerkit-onnx"}))
    with pytest.raises(ValueError, match=r"manifest\.json: expected the field 'format_version'"):
        OnnxPipeline(tmp_path)


def test_a_missing_deploy_extra_is_named(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ImportError, match=r"routerkit\[deploy\]"):
        OnnxPipeline(tmp_path)
    result = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 2 and "pip install 'routerkit[deploy]'" in result.output and "Traceback" not in result.output


def test_auto_exporter_falls_back_to_dynamo_where_the_tracer_fails(tmp_path: Path) -> None:
    """The flagship policy pools a 14 x 16 map to the 4 x 4 patch grid: the TorchScript exporter refuses it."""
    pytest.importorskip("onnxscript")
    from routerkit.deploy.export import _export_graph

    pool = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d((4, 4)))
    example = torch.randn(2, 1, 14, 16)
    with pytest.raises(ExportError, match="torchscript"):
        _export_graph(pool, example, tmp_path / "a.onnx", "x", ["y"], 18, "torchscript")
    assert _export_graph(pool, example, tmp_path / "b.onnx", "x", ["y"], 18, "auto") == "dynamo"
    assert (tmp_path / "b.onnx").exists()
