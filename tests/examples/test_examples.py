"""Every examples/*.yaml through the CLI at a tiny budget (each on its own small fixture)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _tiny import tiny_training
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(Path(__file__).parent))

from test_cifar import tiny_overrides as cifar_tiny  # noqa: E402
from test_cityscapes import tiny_overrides as cityscapes_tiny  # noqa: E402
from test_mnist import tiny_overrides as mnist_tiny  # noqa: E402

from routerkit.cli import app  # noqa: E402
from routerkit.config import load_config  # noqa: E402

BATTERY = [
    "data.params.num_train=9",
    "data.params.num_val=3",
    "data.params.num_test=3",
    "data.params.height=32",
    "data.params.width=32",
    "uncertainty.params.num_passes=2",
    *tiny_training(batch_size=3),
]

# Example family (file name up to the first "_" or ".") -> tiny fixture + overrides.
TINY: dict[str, Callable[[Path], list[str]]] = {
    "battery": lambda _: BATTERY,
    "mnist": mnist_tiny,
    "cifar": cifar_tiny,
    "cityscapes": cityscapes_tiny,
}
SLOW = {"cityscapes_paper.yaml"}  # SegFormer-B5 at paper resolution: minutes even at one step


def _family(config: Path) -> str:
    return config.stem.split("_")[0]


def test_every_example_has_a_tiny_budget() -> None:
    missing = sorted(p.name for p in EXAMPLES.glob("*.yaml") if _family(p) not in TINY)
    assert not missing, f"add a tiny-budget fixture for {missing} to TINY"


@pytest.mark.parametrize(
    "config",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in sorted(EXAMPLES.glob("*.yaml"))],
    ids=lambda p: p.name,
)
def test_every_example_config_trains_at_a_tiny_budget(config: Path, tmp_path: Path) -> None:
    args = ["train", str(config), "--run-dir", str(tmp_path / "run"), "-s", "run.device=cpu"]
    for item in TINY[_family(config)](tmp_path):
        args += ["-s", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics" / "test.json").read_text())
    router = load_config(tmp_path / "run" / "config.yaml").router.name
    assert metrics["results"][0]["name"] == {"paser": "PaSeR"}.get(router, router)  # the configured router comes first
    with open(tmp_path / "run" / "config.yaml") as fh:
        if "compare: true" in fh.read():
            assert (tmp_path / "run" / "compare" / "table1.md").exists()
