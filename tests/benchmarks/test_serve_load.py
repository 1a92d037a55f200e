"""benchmarks/serve_load.py on a tiny calibrated battery run: two deployments, every request answered, the run untouched."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
from _bench import digest, load_script
from _tiny import tiny_battery
from typer.testing import CliRunner

from routerkit.cli import app

pytest.importorskip("fastapi", reason="the benchmark serves the run: pip install 'routerkit[serve]'")
pytest.importorskip("uvicorn", reason="the benchmark serves the run: pip install 'routerkit[serve]'")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serve_load.py"
BATTERY = ROOT / "examples" / "battery.yaml"


def _script() -> ModuleType:
    return load_script("serve_load")


def _digest(folder: Path) -> dict[str, str]:
    return digest(folder)


def test_serve_load_on_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script()
    run_dir = tmp_path / "run"
    runner = CliRunner()
    args = [x for item in (*tiny_battery(), "run.threads=1") for x in ("-s", item)]
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["calibrate", str(run_dir), "--target-share", "0.5", "--tolerance", "0.2"])
    assert result.exit_code == 0, result.output  # half of the units past f_0: the routed row mixes the models
    before = _digest(run_dir)
    capsys.readouterr()

    argv = [str(run_dir), "--checkpoint", "calibrated", "--requests", "12", "--concurrency", "3", "--warmup", "3"]
    rows = script.main([*argv, "--max-batch", "4", "--max-wait-ms", "5", "--threads", "1"])
    out = capsys.readouterr().out

    assert [r.deployment for r in rows] == ["routed", "always largest"]
    for r in rows:
        assert (r.requests, r.failures, r.errors) == (12, 0, []), r
        for value in (r.seconds, r.throughput, r.p50_ms, r.p95_ms, r.p99_ms, r.gflops):
            assert math.isfinite(value) and value > 0, (r.deployment, value)
        assert r.p50_ms <= r.p95_ms <= r.p99_ms
        assert 1.0 <= r.mean_batch <= 4.0  # the measured requests only, within --max-batch
        assert sum(r.mix.values()) == pytest.approx(1.0)
    routed, largest = rows
    assert largest.mix["f2_large"] == pytest.approx(1.0)
    assert routed.mix["f0_small"] > 0.0, "the calibrated router keeps some units on f_0"
    assert script.ratio(rows) == pytest.approx(routed.throughput / largest.throughput)

    assert "machine:" in out and "cores" in out and "threads 1" in out
    assert "synthetic battery scans" in out and "PNG" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| deployment")]
    assert [line.split("|")[1].strip() for line in table] == ["routed", "always largest"]
    assert [line.split("|")[3].strip() for line in table] == ["0", "0"]  # failures
    assert table[1].rstrip().endswith("| 1.00x |")
    assert "routed throughput >= 2x always largest with no failed request:" in out
    assert "failure (" not in out
    assert _digest(run_dir) == before, "the script must not write to the run directory"

    assert "in a process of their own" in out  # the default client: a spawned child process

    # Runs of other data: random model-space inputs as JSON bodies; the client in the server's process.
    monkeypatch.setattr(script, "is_battery_run", lambda parts: False)
    extra = ["--requests", "4", "--concurrency", "2", "--warmup", "0", "--format", "png", "--client", "thread"]
    rows = script.main([*argv[:3], *extra])
    out = capsys.readouterr().out
    assert [(r.requests, r.failures) for r in rows] == [(4, 0), (4, 0)]
    assert "random model-space inputs" in out and "JSON bodies" in out and "format=png" in out
    assert "in the server process" in out


def test_serve_load_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    with pytest.raises(SystemExit) as exc:
        script.main([str(tmp_path)])
    assert exc.value.code == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        script.main([str(tmp_path), "--concurrency", "0"])
    assert exc.value.code == 2
    assert "expected --concurrency >= 1 but got 0" in capsys.readouterr().err
