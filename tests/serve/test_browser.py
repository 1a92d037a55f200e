"""The page in a real browser: headless Chromium loads ``/?demo=1``, which routes a synthetic scan by itself.

Needs Chromium (Debian: ``apt-get install -y chromium``); skipped with that reason when none is found. The
screenshot is kept under the test's tmp_path (its path is printed: ``pytest -s`` shows it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

if TYPE_CHECKING:
    from serve.conftest import LiveServer


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    explicit = os.environ.get("ROUTERKIT_CHROMIUM")
    if explicit:
        return explicit
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


BROWSER = _browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium found (apt-get install -y chromium, or set ROUTERKIT_CHROMIUM to its path)"
)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    command = [
        BROWSER,
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",  # let the page's fetches and rendering finish
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def test_the_page_routes_a_demo_scan_and_shows_the_result(live_server: LiveServer, tmp_path: Path) -> None:
    url = f"{live_server.url}/?demo=1"
    result = _chromium("--dump-dom", url, profile=tmp_path / "profile")
    dom = result.stdout
    assert 'id="status"' in dom, f"no DOM from {BROWSER}: {result.stderr[-2000:]}"
    status = re.search(r'<p id="status" data-state="(\w+)"[^>]*>([^<]*)<', dom)
    assert status is not None and status.group(1) == "done", status.group(0) if status else dom[-3000:]
    assert "Routed synthetic scan" in status.group(2)
    for name in ("gflops-routed", "gflops-largest"):
        number = re.search(rf'id="{name}"[^>]*>([0-9.e+-]+) GFLOPs<', dom)
        assert number is not None and float(number.group(1)) > 0, name
    assert re.search(r'id="largest-name"[^>]*>always f2_large<', dom)
    for image in ("img-input", "img-uncertainty", "img-routing", "img-mask"):
        assert re.search(rf'id="{image}"[^>]*src="data:image/png;base64,', dom) or re.search(
            rf'src="data:image/png;base64,[^"]*"[^>]*id="{image}"', dom
        ), image
    assert '<section id="result">' in dom  # shown: no longer hidden
    assert dom.count('class="swatch"') >= 6  # model and class legends
    shot = tmp_path / "serve_page.png"
    result = _chromium("--window-size=1280,1000", f"--screenshot={shot}", url, profile=tmp_path / "profile2")
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as picture:
        assert picture.size == (1280, 1000)
        colours = picture.convert("RGB").resize((64, 50)).getcolors(64 * 50)
        assert colours is not None and len(colours) > 50  # pictures, not a blank page
    print(f"\nscreenshot of the served page: {shot}")
