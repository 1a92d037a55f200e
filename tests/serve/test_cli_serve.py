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
