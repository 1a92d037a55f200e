"""A context margin (``partitioner.params.halo``) through every stage: pre-training, replay, policy, fine-tuning, evaluation."""

from __future__ import annotations

import io
import json
from pathlib import Path

from _tiny import tiny_battery
from rich.console import Console

from routerkit.config import load_config
from routerkit.config.build import add_plugin_path
from routerkit.training.runner import train

ROOT = Path(__file__).resolve().parents[2]
BATTERY = ROOT / "examples" / "battery.yaml"


def _run(tmp_path: Path, halo: int) -> dict:
    add_plugin_path(BATTERY.parent)
    cfg = load_config(
        BATTERY,
        [
            *tiny_battery(),
            "partitioner.params.rows=2",
            "partitioner.params.cols=2",
            f"partitioner.params.halo={halo}",
            "evaluation.baselines=[single]",
        ],
    )
    run_dir = tmp_path / f"halo{halo}"
    train(cfg, run_dir=run_dir, plugin_dirs=[str(BATTERY.parent)], console=Console(file=io.StringIO(), width=200))
    return json.loads((run_dir / "metrics" / "test.json").read_text())


def test_a_run_with_a_halo_trains_and_charges_the_widened_patches(tmp_path: Path) -> None:
    plain, wide = _run(tmp_path, 0), _run(tmp_path, 4)

    def gflops(metrics: dict, name: str) -> float:
        rows = metrics.get("results", metrics)
        for row in rows:
            if row["name"] == name:
                return float(row["gflops"])
        raise AssertionError(f"{name} not in {[r['name'] for r in rows]}")

    # 16 x 16 patches of a 32 x 32 scan: with 4 pixels each side f_2 runs on 24 x 24, (24 / 16)^2 = 2.25x the FLOPs
    ratio = gflops(wide, "f2_large alone") / gflops(plain, "f2_large alone")
    assert 2.0 < ratio < 2.5
