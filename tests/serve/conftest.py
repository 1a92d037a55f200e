"""Shared by the `routerkit serve` tests: one tiny trained and calibrated battery run, its scans, a live server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="routerkit serve needs the serve extra: pip install 'routerkit[serve]'")
pytest.importorskip("uvicorn", reason="routerkit serve needs the serve extra: pip install 'routerkit[serve]'")

from _tiny import tiny_battery

import routerkit
from routerkit.cli import app
from routerkit.deploy import RoutedModel

ROOT = Path(__file__).resolve().parents[2]
#: The checkpoint the tests serve: the tiny router calibrated to send half of the units past f_0 (mixed routing).
CHECKPOINT = "calibrated"


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seconds-long battery run (32 x 32 scans, 4 x 4 patches), calibrated so that routing mixes the models."""
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    args = [x for item in (*tiny_battery(), "run.threads=1") for x in ("-s", item)]
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(ROOT / "examples" / "battery.yaml"), "--run-dir", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["calibrate", str(run_dir), "--target-share", "0.5", "--tolerance", "0.2"])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="session")
def served_model(serve_run: Path) -> RoutedModel:
    """The model a server routes with: fixed MC-dropout masks, as `routerkit serve` loads it."""
    return routerkit.load(serve_run, checkpoint=CHECKPOINT, mask_seed=0)


@pytest.fixture(scope="session")
def reference_model(serve_run: Path) -> RoutedModel:
    """A second copy, for the expected answers (never called while a server routes with the first)."""
    return routerkit.load(serve_run, checkpoint=CHECKPOINT, mask_seed=0)


@pytest.fixture(scope="session")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """16-bit grayscale PNGs: ``trained`` of the trained size (32 x 32), ``tiled`` of other sizes."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"trained": [], "tiled": []}
    for kind, sizes in (("trained", [(32, 32)] * 12), ("tiled", [(40, 70), (20, 24), (64, 33)])):
        for i, (height, width) in enumerate(sizes):
            smooth = np.kron(rng.random((height // 4 + 1, width // 4 + 1)), np.ones((4, 4)))[:height, :width]
            pixels = np.clip(65535 * (0.7 * smooth + 0.3 * rng.random((height, width))), 0, 65535).astype(np.uint16)
            path = folder / f"{kind}_{i:02d}.png"
            Image.fromarray(pixels).save(path)
            out[kind].append(path)
    return out


@dataclass
class LiveServer:
    """A uvicorn server running `create_app` in a thread on 127.0.0.1."""

    url: str
    app: object
    server: object
    thread: threading.Thread


def free_socket() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a port the system picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="session")
def live_server(served_model: RoutedModel, serve_run: Path) -> Iterator[LiveServer]:
    """`create_app` on the served model behind a real uvicorn server (batches of up to 8 within 25 ms)."""
    import uvicorn

    from routerkit.serve import ServeSettings, create_app

    settings = ServeSettings(max_batch=8, max_wait_ms=25.0, max_bytes=100_000)
    api = create_app(served_model, settings, {"run_dir": str(serve_run), "checkpoint": CHECKPOINT})
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", api, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
