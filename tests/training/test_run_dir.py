"""A run directory is never silently overwritten, mixed or trained twice at once; resume logs each epoch once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny import tiny_battery
from typer.testing import CliRunner

from routerkit.cli import app
from routerkit.config import ConfigError, load_config
from routerkit.config.build import add_plugin_path
from routerkit.training import runner as run_mod
from routerkit.training.policy import PolicyTraining
from routerkit.training.run_lock import RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[2]
BATTERY = ROOT / "examples" / "battery.yaml"
TINY = tiny_battery(policy_epochs=1)


def _cfg(*extra: str):  # type: ignore[no-untyped-def]
    add_plugin_path(BATTERY.parent)
    return load_config(BATTERY, [*TINY, *extra])


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_mod.train(_cfg(), run_dir=run_dir)
    final = (run_dir / "checkpoints" / "final.safetensors").read_bytes()
    log = (run_dir / "metrics" / "train_log.jsonl").read_text()
    config = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run.*--overwrite"):
        run_mod.train(_cfg("reward.lam=0.7"), run_dir=run_dir)
    # Nothing of the finished run was touched.
    assert (run_dir / "checkpoints" / "final.safetensors").read_bytes() == final
    assert (run_dir / "metrics" / "train_log.jsonl").read_text() == log
    assert (run_dir / "config.yaml").read_text() == config
    result = CliRunner().invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *[x for o in TINY for x in ("-s", o)]])
    assert result.exit_code == 2 and "--overwrite" in result.output, result.output
    # With --overwrite the old stage checkpoints and log rows are gone, not mixed with the new ones.
    (run_dir / "checkpoints" / "0-stale-e0000.json").write_text("{}")
    run_mod.train(_cfg("reward.lam=0.7"), run_dir=run_dir, overwrite=True)
    assert not (run_dir / "checkpoints" / "0-stale-e0000.json").exists()
    assert "lam: 0.7" in (run_dir / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == len({(r["stage"], r["epoch"], "warning" in r) for r in rows})


def test_resume_with_a_config_or_overrides_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(BATTERY), "-s", "reward.lam=0.3", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "CONFIG, -s/--set would be ignored" in result.output


def test_two_processes_cannot_train_one_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        with pytest.raises(RunLocked, match="is being trained by"):
            run_mod.train(_cfg(), run_dir=run_dir)
        assert not (run_dir / "config.yaml").exists()  # refused before writing anything
    run_mod.train(_cfg(), run_dir=run_dir)  # the lock is released on exit
    with RunLock(run_dir), pytest.raises(RunLocked):
        run_mod.train(None, resume=run_dir)  # type: ignore[arg-type]


def test_epochs_logged_but_not_checkpointed_are_logged_once_after_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg("training.policy.epochs=3", "run.checkpoint_every=2")
    run_dir = tmp_path / "run"
    original = PolicyTraining.run_epoch

    def crash(self: PolicyTraining, epoch: int) -> dict[str, float]:
        if epoch == 1:  # epoch 0 was logged but, with checkpoint_every=2, not checkpointed
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(PolicyTraining, "run_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_mod.train(cfg, run_dir=run_dir)
    monkeypatch.setattr(PolicyTraining, "run_epoch", original)
    run_mod.train(None, resume=run_dir)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    epochs = [(r["stage"], r["epoch"]) for r in rows if "warning" not in r]
    assert epochs.count(("policy", 0)) == 1
    assert len(epochs) == len(set(epochs))
    assert [e for s, e in epochs if s == "policy"] == [0, 1, 2]


def test_a_rejected_config_leaves_no_run_to_overwrite(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError):
        run_mod.train(_cfg("data.params.num_train=2"), run_dir=run_dir)
    assert not (run_dir / "config.yaml").exists()
    run_mod.train(_cfg(), run_dir=run_dir)  # the retry needs no --overwrite
    assert (run_dir / "checkpoints" / "final.safetensors").exists()
