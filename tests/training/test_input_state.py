"""A PaSeR policy reading the input itself (``router.params.input_channels``): replay, policy, fine-tuning, evaluation."""

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


def test_a_policy_reading_the_input_trains_on_the_replay_and_routes(tmp_path: Path) -> None:
    add_plugin_path(BATTERY.parent)
    cfg = load_config(BATTERY, [*tiny_battery(policy_epochs=2), "router.params.input_channels=1", "evaluation.baselines=[]"])
    run_dir = tmp_path / "input_state"
    train(cfg, run_dir=run_dir, plugin_dirs=[str(BATTERY.parent)], console=Console(file=io.StringIO(), width=200))
    rows = json.loads((run_dir / "metrics" / "test.json").read_text())
    rows = rows.get("results", rows)
    assert rows[0]["name"] == "PaSeR" and rows[0]["gflops"] > 0
