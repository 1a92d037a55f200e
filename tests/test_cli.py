"""End-to-end tests of the command line on the battery example at a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routerkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "examples" / "battery.yaml"

TINY = [
    "data.params.num_train=12",
    "data.params.num_val=4",
    "data.params.num_test=4",
    "data.params.height=32",
    "data.params.width=32",
    "zoo.models.1.params.base_channels=2",
    "zoo.models.2.params.base_channels=4",
    "uncertainty.params.num_passes=2",
    "training.pretrain_large.epochs=1",
    "training.pretrain_base.epochs=1",
    "training.policy.epochs=2",
    "training.finetune.epochs=1",
]


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
    for cmd in ([], ["train"], ["evaluate"], ["validate"], ["list"]):
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


def test_list() -> None:
    result = runner.invoke(app, ["list", "routers"])
    assert result.exit_code == 0
    assert "paser" in result.output and "random" in result.output


def test_train_then_evaluate_tiny(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *_args()])
    assert result.exit_code == 0, result.output
    for name in ("PaSeR", "f0_small alone", "f2_large alone", "PaSeR-RandPol", "IoU/GigaFlop"):
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
    for a, b in zip(metrics["results"], re_metrics["results"], strict=True):
        if a["name"] != "PaSeR":  # PaSeR's MC-dropout state is stochastic; others are exact
            assert a["mean_iou"] == pytest.approx(b["mean_iou"], abs=1e-6)
        assert a["gflops"] == pytest.approx(b["gflops"], rel=1e-9)


def test_resume_continues_an_interrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from routerkit.config import load_config
    from routerkit.config.build import add_plugin_path
    from routerkit.training import runner as run_mod
    from routerkit.training.stages import PolicyTraining

    add_plugin_path(BATTERY.parent)
    cfg = load_config(BATTERY, TINY)
    run_dir = tmp_path / "run"
    original = PolicyTraining.run_epoch

    def crash(self: PolicyTraining, epoch: int) -> dict[str, float]:
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(PolicyTraining, "run_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_mod.train(cfg, run_dir=run_dir, plugin_dirs=[str(BATTERY.parent)])
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["metadata"]["stage"] == "policy" and latest["metadata"]["epoch"] == 0
    monkeypatch.setattr(PolicyTraining, "run_epoch", original)
    result = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "Resuming" in result.output
    log = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    seen = [(e["stage"], e["epoch"]) for e in log]
    assert len(seen) == len(set(seen)), "an epoch ran twice"
    assert ("policy", 1) in seen and ("finetune", 0) in seen
    assert (run_dir / "metrics" / "test.json").exists()


def test_bad_data_gives_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(tmp_path / "r"), *_args("data.params.height=30")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "30" in result.output
    assert "Traceback" not in result.output
