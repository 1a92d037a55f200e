"""End-to-end tests of the command line on the battery example at a tiny budget."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _tiny import tiny_battery
from click.testing import Result
from typer.testing import CliRunner

from routerkit.cli import app
from routerkit.training.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "examples" / "battery.yaml"

TINY = tiny_battery(policy_epochs=2)


def _args(*extra: str) -> list[str]:
    out: list[str] = []
    for item in (*TINY, *extra):
        out += ["-s", item]
    return out


runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import routerkit.cli

    monkeypatch.setattr(routerkit.cli, "console", Console(width=200))


def test_help_of_every_command() -> None:
    commands = ["train", "evaluate", "compare", "calibrate", "robustness", "predict", "export", "validate", "list"]
    for cmd in ([], *([c] for c in commands)):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(BATTERY)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    bad = runner.invoke(app, ["validate", str(BATTERY), "-s", "reward.lamda=0.3"])
    assert bad.exit_code == 2
    assert "reward.lamda" in bad.output
    typo = runner.invoke(app, ["validate", str(BATTERY), "-s", "router.name=pasr"])
    assert typo.exit_code == 2
    assert "paser" in typo.output  # suggestion / list of valid names
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def _fails_cleanly(result: Result, *needles: str) -> None:
    """Exit code 2 with an ``error:`` line naming every needle, and no Python traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "error:" in result.output and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.mark.parametrize(
    "override",
    [
        "zoo.models.0.model=nopkg.mod:Net",
        "router.name=nopkg.mod:Router",
        "uncertainty.name=nopkg.mod:Estimator",
        "cost.name=nopkg.mod:Cost",
        "partitioner.name=nopkg.mod:Grid",
        "data.factory=nopkg.mod:build_data",
        "data.factory=battery_plugin:no_such_factory",
    ],
)
def test_validate_imports_dotted_paths(override: str) -> None:
    field = override.partition("=")[0]
    result = runner.invoke(app, ["validate", str(BATTERY), "-s", override])
    _fails_cleanly(result, f"{field}:", "nopkg" if "nopkg" in override else "no_such_factory")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("router.params.widht=3", ["router.params:", "width", "'widht'"]),
        ("uncertainty.params.passes=3", ["uncertainty.params:", "num_passes", "'passes'"]),
        ("cost.params.base=share", ["cost.params:", "base_cost", "'base'"]),
        ("partitioner.params.row=2", ["partitioner.params:", "rows, cols", "'row'"]),
        ("zoo.models.1.params.channels=8", ["zoo.models.1.params:", "base_channels", "'channels'"]),
        ("data.params.num_trian=8", ["data.params:", "num_train", "'num_trian'"]),
    ],
)
def test_validate_checks_params_against_signatures(override: str, needles: list[str]) -> None:
    _fails_cleanly(runner.invoke(app, ["validate", str(BATTERY), "-s", override]), *needles)


def test_validate_builds_models_on_the_meta_device() -> None:
    result = runner.invoke(app, ["validate", str(BATTERY), "-s", "zoo.models.2.params.dropout_at=nowhere"])
    _fails_cleanly(result, "zoo.models.2 ('f2_large')", "dropout_at", "'nowhere'")


def test_validate_reports_every_problem_at_once() -> None:
    result = runner.invoke(app, ["validate", str(BATTERY), "-s", "router.params.widht=3", "-s", "zoo.models.1.params.depth=-1"])
    _fails_cleanly(result, "router.params:", "zoo.models.1 ('f1_medium')")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_validate_checks_the_device_is_available(device: str) -> None:
    _fails_cleanly(runner.invoke(app, ["validate", str(BATTERY), "-s", f"run.device={device}"]), "no CUDA device is available")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("zoo.models.0.params.dropout=[0.1]", ["zoo.models.0.params.dropout: Expected the dropout probability"]),
        ("zoo.models.0.params.dropout=high", ["zoo.models.0.params.dropout:", "'high'"]),
        ("training.policy.lr=.inf", ["training.policy.lr: Expected a finite number"]),
        ("training.policy.lr=1.0e30", ["training.policy.lr: Expected a value less than or equal to 10"]),
        ("training.pretrain_base.beta=.inf", ["training.pretrain_base.beta: Expected a finite number"]),
        ("run.seed=100000000000000000000", ["run.seed:"]),
        ("run.device=meta", ["run.device: Expected a device that can train", "'meta'"]),
        ("training.policy.epochs=true", ["training.policy.epochs: Expected a valid integer but got True"]),
        ("a.b=[1", ["Override 'a.b=[1'", "YAML"]),
        ("partitioner.params.rows=0", ["partitioner.params: Expected rows >= 1"]),
        ("uncertainty.params.num_passes=0", ["uncertainty.params: Expected num_passes >= 1"]),
        ("router.params.init_bias=[1]", ["router.params: Expected init_bias of length 3"]),
    ],
)
def test_validate_rejects_fuzzed_values(override: str, needles: list[str]) -> None:
    _fails_cleanly(runner.invoke(app, ["validate", str(BATTERY), "-s", override]), *needles)


def test_validate_rejects_an_output_dir_that_is_a_file(tmp_path: Path) -> None:
    existing = tmp_path / "runs"
    existing.write_text("a file")
    result = runner.invoke(app, ["validate", str(BATTERY), "-s", f"run.output_dir={existing}"])
    _fails_cleanly(result, "run.output_dir:", "is an existing file")


def test_non_utf8_config_file(tmp_path: Path) -> None:
    config = tmp_path / "battery.yaml"
    config.write_bytes(BATTERY.read_bytes() + "# r\xe9sum\xe9\n".encode("latin-1"))
    for cmd in ("validate", "train"):
        _fails_cleanly(runner.invoke(app, [cmd, str(config)]), str(config), "UTF-8")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("zoo.models.0.model=nopkg.mod:Net", ["zoo.models.0.model:", "nopkg"]),
        ("router.name=nopkg.mod:Router", ["router.name:", "nopkg"]),
        ("data.params.num_train=2", ["data (battery_plugin:build_data", "at least 3 training samples", "got 2"]),
        ("zoo.models.1.params.num_classes=5", ["zoo.models.1 ('f1_medium')", "[1, 3, 8, 8]", "[1, 5, 8, 8]"]),
        ("zoo.models.2.params.in_channels=3", ["zoo.models.2 ('f2_large')", "[1, 1, 8, 8]", "channels"]),
        ("evaluation.expert_key=noise", ["evaluation.expert_key:", "fineness", "'noise'"]),
    ],
)
def test_train_rejects_bad_configs_before_training(tmp_path: Path, override: str, needles: list[str]) -> None:
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(tmp_path / "r"), *_args(override)])
    _fails_cleanly(result, *needles)
    assert not (tmp_path / "r" / "metrics" / "train_log.jsonl").exists()


def test_list() -> None:
    result = runner.invoke(app, ["list", "routers"])
    assert result.exit_code == 0
    assert "paser" in result.output and "random" in result.output


def test_train_then_evaluate_tiny(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *_args()])
    assert result.exit_code == 0, result.output
    for name in ("PaSeR", "f0_small alone", "f2_large alone", "PaSeR-RandPol", "IoU/GigaFlop", "accuracy"):
        assert name in result.output
    metrics = json.loads((run_dir / "metrics" / "test.json").read_text())
    names = [r["name"] for r in metrics["results"]]
    assert names == ["PaSeR", "f0_small alone", "f1_medium alone", "f2_large alone", "PaSeR-RandPol"]
    assert "multiply-add" in metrics["flop_convention"]
    for r in metrics["results"]:
        assert 0.0 <= r["mean_iou"] <= 1.0 and r["gflops"] > 0
        assert abs(sum(r["usage"]) - 1.0) < 1e-6
    assert (run_dir / "checkpoints" / "final.safetensors").exists()
    assert (run_dir / "metrics" / "test.csv").read_text().startswith("strategy,")
    again = runner.invoke(app, ["evaluate", str(run_dir)])
    assert again.exit_code == 0, again.output
    re_metrics = json.loads((run_dir / "metrics" / "test.json").read_text())
    # Evaluation seeds the MC-dropout draws: `evaluate` repeats the table printed by `train` exactly.
    assert re_metrics == metrics


@pytest.mark.parametrize(
    ("stage_name", "crash_epoch", "latest_stage", "latest_epoch"),
    [("policy", 1, "policy", 0), ("finetune", 0, "policy", 1)],
)
def test_resume_continues_an_interrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_name: str, crash_epoch: int, latest_stage: str, latest_epoch: int
) -> None:
    from routerkit.config import load_config
    from routerkit.config.build import add_plugin_path
    from routerkit.training import runner as run_mod
    from routerkit.training.finetune import JointFineTuning
    from routerkit.training.policy import PolicyTraining

    add_plugin_path(BATTERY.parent)
    cfg = load_config(BATTERY, TINY)
    run_dir = tmp_path / "run"
    stage_cls = {"policy": PolicyTraining, "finetune": JointFineTuning}[stage_name]
    original = stage_cls.run_epoch

    def crash(self: PolicyTraining, epoch: int) -> dict[str, float]:
        if epoch == crash_epoch:
            raise KeyboardInterrupt
        return original(self, epoch)  # type: ignore[arg-type]

    monkeypatch.setattr(stage_cls, "run_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_mod.train(cfg, run_dir=run_dir, plugin_dirs=[str(BATTERY.parent)])
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["metadata"]["stage"] == latest_stage and latest["metadata"]["epoch"] == latest_epoch
    monkeypatch.setattr(stage_cls, "run_epoch", original)
    result = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "Resuming" in result.output
    log = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    seen = [(e["stage"], e["epoch"]) for e in log if "warning" not in e]  # a warning is a row of its own
    assert len(seen) == len(set(seen)), "an epoch ran twice"
    assert (stage_name, crash_epoch) in seen and ("finetune", 0) in seen
    # The resumed run ends exactly where an uninterrupted one does: same weights, same table.
    straight_dir = tmp_path / "straight"
    run_mod.train(cfg, run_dir=straight_dir, plugin_dirs=[str(BATTERY.parent)])
    resumed_state, _ = load_checkpoint(run_dir, "final")
    straight_state, _ = load_checkpoint(straight_dir, "final")
    for part in ("zoo", "router"):
        for key, value in straight_state["model"][part].items():
            assert torch.equal(resumed_state["model"][part][key], value), f"{part}.{key} differs after resume"
    assert (run_dir / "metrics" / "test.json").read_text() == (straight_dir / "metrics" / "test.json").read_text()


def test_bad_data_gives_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(tmp_path / "r"), *_args("data.params.height=30")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "30" in result.output
    assert "Traceback" not in result.output


COMPARE_TINY = [
    "compare.sweep_lambdas=[0.1, 0.6]",
    "compare.sweep_policy_epochs=2",
    "compare.idk_offsets=[-1.0, 0.0, 1.0]",
    "compare.stop_alphas=[0.1, 1.0]",
    "compare.stop_epochs=3",
    "compare.idk_grid_steps=3",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *_args()])
    assert result.exit_code == 0, result.output
    return run_dir


def test_compare_writes_every_table_and_the_pareto_figure(tiny_run: Path) -> None:
    args = [x for item in COMPARE_TINY for x in ("-s", item)]
    result = runner.invoke(app, ["compare", str(tiny_run), *args])
    assert result.exit_code == 0, result.output
    folder = tiny_run / "compare"
    for name in (
        "table1.md",
        "table1.csv",
        "table1.json",
        "table2.md",
        "table2.json",
        "assignment.md",
        "pareto.csv",
        "pareto.png",
    ):
        assert (folder / name).exists(), name
    rows = json.loads((folder / "table1.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    for expected in ("PaSeR", "IDK cascade (IoU match)", "PaSeR-RandPol", "f2_large alone", "Oracle"):
        assert expected in names
    assert any(n.startswith("IDK cascade (grid") for n in names) and any(n.startswith("Optimal stopping") for n in names)
    oracle = next(r for r in rows if r["name"] == "Oracle")
    for r in rows:  # the oracle bounds every strategy's reward on the same split and the same zoo
        if "(joint" not in r["name"]:  # the joint cascade answers with classifiers of its own
            assert r["mean_reward"] <= oracle["mean_reward"] + 1e-9
        assert sum(map(sum, r["assignment"])) == 4 * 16
    table2 = json.loads((folder / "table2.json").read_text())
    assert {"paser", "idk_iou_match", "gflops_ratio_idk_over_paser", "matched_within_1e-3"} <= set(table2)
    families = {line.split(",")[0] for line in (folder / "pareto.csv").read_text().splitlines()[1:]}
    assert {"PaSeR", "IDK cascade", "Optimal stopping", "Oracle", "f0_small alone"} <= families
    assert "multiply-add" in result.output
    bad = runner.invoke(app, ["compare", str(tiny_run), "-s", "reward.lam=0.3"])
    assert bad.exit_code == 2 and "compare.*" in bad.output


def test_calibrate_hits_a_share_target_and_keeps_final(tiny_run: Path) -> None:
    result = runner.invoke(app, ["calibrate", str(tiny_run), "--target-share", "0.5", "--tolerance", "0.2"])
    assert result.exit_code == 0, result.output
    calib = json.loads((tiny_run / "calibration.json").read_text())
    assert calib["metric"] == "share" and calib["knob"] == "logit_bias"
    assert calib["within_tolerance"] and abs(calib["val"] - 0.5) <= 0.1
    assert (tiny_run / "checkpoints" / "calibrated.safetensors").exists()
    latest = json.loads((tiny_run / "checkpoints" / "latest.json").read_text())
    assert latest["name"] == "final"  # the side checkpoint does not become what --resume continues from
    again = runner.invoke(app, ["evaluate", str(tiny_run), "--checkpoint", "calibrated"])
    assert again.exit_code == 0, again.output
    both = runner.invoke(app, ["calibrate", str(tiny_run)])
    assert both.exit_code == 2 and "exactly one" in both.output
    missing = runner.invoke(app, ["evaluate", str(tiny_run), "--checkpoint", "nope"])
    assert missing.exit_code == 2 and "nope" in missing.output


@pytest.mark.parametrize("router", ["idk", "optimal_stopping"])
def test_train_cascade_routers_from_yaml(tmp_path: Path, router: str) -> None:
    run_dir = tmp_path / router
    extra = ["training.cascade.policy_epochs=3", "training.cascade.grid_steps=3"]
    result = runner.invoke(
        app, ["train", str(BATTERY), "--run-dir", str(run_dir), *_args(f"router.name={router}", "router.params={}", *extra)]
    )
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log][-1] == "fit_cascade"
    assert "fit/gflops" in log[-1]
    metrics = json.loads((run_dir / "metrics" / "test.json").read_text())
    assert metrics["results"][0]["name"] == router


def test_robustness_reports_degradation_and_large_model_share(tiny_run: Path) -> None:
    before = (tiny_run / "checkpoints" / "final.safetensors").read_bytes()
    result = runner.invoke(app, ["robustness", str(tiny_run), "--amount", "0.05", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tiny_run / "robustness" / "robustness.json").read_text())
    assert report["amount"] == 0.05 and report["init"] == "scratch" and report["epochs"] == 1
    assert set(report["results"]) == {"clean", "noisy", "noisy_original_models"}
    summary = {s["strategy"]: s for s in report["summary"]}
    assert set(summary) == {"PaSeR", "PaSeR-RandPol"}
    for s in summary.values():
        clean = next(r for r in report["results"]["clean"] if r["name"] == s["strategy"])
        assert s["large_share_clean"] == pytest.approx(1 - clean["usage"][0])
        assert s["degradation"] == pytest.approx((s["iou_clean"] - s["iou_noisy"]) / s["iou_clean"])
    assert "degradation" in (tiny_run / "robustness" / "robustness.md").read_text()
    assert (tiny_run / "checkpoints" / "final.safetensors").read_bytes() == before  # the run's models are untouched
    bad = runner.invoke(app, ["robustness", str(tiny_run), "--init", "nope"])
    assert bad.exit_code == 2 and "init" in bad.output


# ---------------------------------------------------------------- corrupted run directories


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _header_length(path: Path, length: int) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])


def _garbage_header(path: Path) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"\xff" * length + data[8 + length :])


def _edit_final(run_dir: Path, edit: Callable[[dict[str, dict[str, torch.Tensor]]], None]) -> None:
    state, meta = load_checkpoint(run_dir, "final")
    edit(state["model"])
    save_checkpoint(run_dir, "final", state, meta, update_latest=False)


def _drop_first_key(model: dict[str, dict[str, torch.Tensor]], prefix: str) -> None:
    del model["zoo"][next(k for k in model["zoo"] if k.startswith(prefix))]


def _all_nan(model: dict[str, dict[str, torch.Tensor]]) -> None:
    for part in model.values():
        for key, value in part.items():
            if value.is_floating_point():
                part[key] = torch.full_like(value, float("nan"))


CKPT = Path("checkpoints")
# case: (corrupt the run directory, interrupted (no final checkpoint: evaluate reads latest.json), expected in the error)
RUN_CORRUPTIONS: dict[str, tuple[Callable[[Path], None], bool, list[str]]] = {
    "safetensors-truncated": (lambda r: _cut(r / CKPT / "final.safetensors"), False, ["final.safetensors", "truncated"]),
    "safetensors-oversized-header": (
        lambda r: _header_length(r / CKPT / "final.safetensors", 2**40),
        False,
        ["final.safetensors", "header too large"],
    ),
    "safetensors-garbage-header": (
        lambda r: _garbage_header(r / CKPT / "final.safetensors"),
        False,
        ["final.safetensors", "expected a safetensors file"],
    ),
    "checkpoint-json-truncated": (lambda r: _cut(r / CKPT / "final.json"), False, ["final.json", "expected a JSON object"]),
    "checkpoint-json-garbage": (
        lambda r: (r / CKPT / "final.json").write_bytes(b"\x00\xff\xfe garbage"),
        False,
        ["final.json", "expected a JSON object"],
    ),
    "latest-truncated": (lambda r: _cut(r / CKPT / "latest.json"), True, ["latest.json", 'expected a JSON object {"name"']),
    "latest-garbage": (
        lambda r: (r / CKPT / "latest.json").write_bytes(b"\xff\xfe{{"),
        True,
        ["latest.json", 'expected a JSON object {"name"'],
    ),
    "missing-tensor": (
        lambda r: _edit_final(r, lambda m: _drop_first_key(m, "members.1.")),
        False,
        ["final.safetensors", "zoo model 'f1_medium': missing keys 'members.1."],
    ),
    "unexpected-tensor": (
        lambda r: _edit_final(r, lambda m: m["router"].update({"policy.extra": torch.zeros(3)})),
        False,
        ["final.safetensors", "router (PaSeRRouter): unexpected keys 'policy.extra'"],
    ),
    "wrong-shape": (
        lambda r: _edit_final(r, lambda m: m["router"].update({"policy.head.weight": torch.zeros(4, 24, 1, 1)})),
        False,
        ["final.safetensors", "expected 'policy.head.weight' of shape [3, 24, 1, 1] but got [4, 24, 1, 1]"],
    ),
    "all-nan-weights": (
        lambda r: _edit_final(r, _all_nan),
        False,
        ["final.safetensors", "expected finite weights but got NaN or inf", "zoo model 'f0_small' 'members.0."],
    ),
    "config-invalid-yaml": (
        lambda r: (r / "config.yaml").write_text("run: {name: [unclosed\n"),
        False,
        ["config.yaml", "is corrupted", "unreadable"],
    ),
    "config-not-a-mapping": (
        lambda r: (r / "config.yaml").write_text("- run\n- data\n"),
        False,
        ["config.yaml", "expected a mapping of config sections but got a YAML list"],
    ),
    "config-empty": (lambda r: (r / "config.yaml").write_text(""), False, ["config.yaml", "but got an empty file"]),
    "config-not-utf8": (lambda r: (r / "config.yaml").write_bytes(b"\xff\xfe\x00r"), False, ["config.yaml", "unreadable"]),
}


@pytest.fixture
def copy_of_tiny_run(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny run to corrupt; loading it is about its files, not about trusting its plugin code."""
    from routerkit.training import run_dir as run_mod

    monkeypatch.setattr(run_mod, "check_run_trust", lambda *args, **kwargs: None, raising=False)
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    return run_dir


@pytest.mark.parametrize("command", ["evaluate", "resume"])
@pytest.mark.parametrize("case", list(RUN_CORRUPTIONS))
def test_corrupted_run_directory_gives_an_error_naming_the_file(copy_of_tiny_run: Path, case: str, command: str) -> None:
    corrupt, interrupted, expected = RUN_CORRUPTIONS[case]
    if interrupted:  # killed before the final checkpoint: both commands continue from latest.json
        for suffix in (".json", ".safetensors"):
            (copy_of_tiny_run / CKPT / f"final{suffix}").unlink()
    corrupt(copy_of_tiny_run)
    args = ["evaluate", str(copy_of_tiny_run)] if command == "evaluate" else ["train", "--resume", str(copy_of_tiny_run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception (a traceback outside the runner)
    assert "error:" in result.output and "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output


def test_resume_removes_temp_files_of_a_killed_checkpoint_write(copy_of_tiny_run: Path) -> None:
    folder = copy_of_tiny_run / CKPT
    stale = [".final.safetensors.x8_k2mq1.tmp", ".latest.json.0a1b2c3d.tmp"]
    kept = ["notes.tmp", ".final.safetensors.tmp", "keep.json.0a1b2c3d.tmp"]
    for name in stale + kept:
        (folder / name).write_bytes(b"half a checkpoint")
    result = runner.invoke(app, ["train", "--resume", str(copy_of_tiny_run)])
    assert result.exit_code == 0, result.output
    left = {p.name for p in folder.iterdir()}
    assert not left & set(stale) and set(kept) <= left


def test_every_strategy_is_judged_against_the_single_model_frontier(tiny_run: Path, tmp_path: Path) -> None:
    table = json.loads((tiny_run / "metrics" / "test.json").read_text())["results"]
    by_name = {r["name"]: r for r in table}
    for r in table:
        assert {"hull_quality", "hull_gain", "hull_saving", "state_gflops"} <= set(r)
        if r["hull_quality"] is not None and r["hull_quality"] == r["hull_quality"]:  # not NaN
            assert r["hull_gain"] == pytest.approx(r["mean_iou"] - r["hull_quality"])
    for name in ("f0_small alone", "f1_medium alone", "f2_large alone"):
        assert by_name[name]["hull_gain"] <= 1e-9  # single models are on or below their own frontier
    assert by_name["f1_medium alone"]["state_gflops"] == 0.0 and by_name["PaSeR"]["state_gflops"] > 0
    out = tmp_path / "cmp"
    args = [x for item in COMPARE_TINY for x in ("-s", item)]
    result = runner.invoke(app, ["compare", str(tiny_run), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["frontier"]["apgr"] == pytest.approx(0.5) or len(frontier["frontier"]["points"]) > 2
    assert {"paser", "idk", "optimal_stopping", "oracle"} <= set(frontier["families"])
    for fam in frontier["families"].values():
        assert {"apgr", "aiq", "max_hull_gain", "points"} <= set(fam)
    rows = json.loads((out / "table1.json").read_text())["rows"]
    assert all("hull_gain" in row["result"] for row in rows)
    assert "vs frontier" in (out / "table1.md").read_text() and "APGR" in (out / "frontier.md").read_text()
