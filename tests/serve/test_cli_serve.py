"""``routerkit serve``: the options reach the app, a missing extra is a readable error."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from routerkit.cli import app


def test_serve_loads_the_run_with_fixed_masks_and_runs_uvicorn(serve_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import routerkit.serve

    seen: dict[str, Any] = {}

    def fake_run(api: Any, host: str, port: int) -> None:
        seen.update(app=api, host=host, port=port)

    monkeypatch.setattr(routerkit.serve, "run_server", fake_run)
    args = ["serve", str(serve_run), "--port", "9123", "--max-batch", "5", "--max-wait-ms", "2.5", "--max-bytes", "1000"]
    result = CliRunner().invoke(app, [*args, "--checkpoint", "calibrated"])
    assert result.exit_code == 0, result.output
    assert "Serving" in result.output and "http://127.0.0.1:9123" in result.output and "seed 0" in result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 9123
    state = seen["app"].state
    assert (state.settings.max_batch, state.settings.max_wait_ms, state.settings.max_bytes) == (5, 2.5, 1000)
    assert state.model.mask_seed == 0


def test_serve_errors_are_readable(serve_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "error" in missing.output
    bad = CliRunner().invoke(app, ["serve", str(serve_run), "--max-batch", "0"])
    assert bad.exit_code == 2 and "max-batch" in bad.output
    for name in [m for m in sys.modules if m == "routerkit.serve" or m.startswith("routerkit.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    result = CliRunner().invoke(app, ["serve", str(serve_run)])
    assert result.exit_code == 2, result.output
    assert "pip install 'routerkit[serve]'" in result.output and "fastapi" in result.output


def test_serve_is_listed_in_the_help() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--host", "--port", "--max-batch", "--max-wait-ms", "--max-bytes", "--checkpoint", "--trust-remote-code"):
        assert option in result.output


def test_settings_come_from_the_run_then_config_then_set_then_flags(
    serve_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import yaml

    import routerkit.serve

    seen: dict[str, Any] = {}
    monkeypatch.setattr(routerkit.serve, "run_server", lambda api, host, port: seen.update(app=api, host=host, port=port))
    run = tmp_path / "run"
    shutil.copytree(serve_run, run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["serve"] = {"port": 9001, "max_batch": 3, "max_wait_ms": 7.0, "max_bytes": 1111}  # the run's own section
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    from routerkit.training.trust import record_trusted_run

    record_trusted_run(run)  # the copy was changed after `routerkit train`: mark it as ours again
    file = tmp_path / "serve.yaml"
    file.write_text("serve:\n  max_batch: 4\n  max_wait_ms: 8\n")
    args = ["serve", str(run), "--config", str(file), "-s", "max_wait_ms=9", "-s", "port=9002", "--port", "9003"]
    result = CliRunner().invoke(app, [*args, "--checkpoint", "calibrated"])
    assert result.exit_code == 0, result.output
    settings = seen["app"].state.settings
    # max_bytes from the run, max_batch from --config, max_wait_ms from -s, port from the flag (which wins over -s)
    assert (settings.max_bytes, settings.max_batch, settings.max_wait_ms, seen["port"]) == (1111, 4, 9.0, 9003)
    del raw["serve"]  # a run saved before the serve: section existed serves with the defaults
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    record_trusted_run(run)
    assert CliRunner().invoke(app, ["serve", str(run), "--checkpoint", "calibrated"]).exit_code == 0
    assert seen["port"] == 8000 and seen["app"].state.settings.max_batch == 32


def test_set_can_fill_an_optional_section_and_bad_keys_are_named(serve_run: Path) -> None:
    from routerkit.config import ConfigError, merge_serve_config
    from routerkit.config.schema import ServeConfig

    cfg = merge_serve_config(ServeConfig(), {}, "--set", ["ray.ingress.autoscaling.max_replicas=3"])
    assert cfg.ray.ingress.autoscaling is not None and cfg.ray.ingress.autoscaling.max_replicas == 3
    with pytest.raises(ConfigError, match=r"serve\.ray\.ingress\.num_cpu: unknown field"):
        merge_serve_config(ServeConfig(), {}, "--set", ["ray.ingress.num_cpu=2"])
    with pytest.raises(ConfigError, match=r"serve\.ray\.ingress\.max_ongoing_requests"):
        merge_serve_config(ServeConfig(), {"backend": "ray", "max_batch": 64}, "x")
