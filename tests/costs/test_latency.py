"""Tests of routerkit.costs.LatencyCost: measured seconds per unit, normalised as PaSeR Eq. 3, measured once per run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _tiny import tiny_battery
from rich.console import Console
from torch import Tensor, nn
from typer.testing import CliRunner

import routerkit.costs as costs_mod
from routerkit.cli import app
from routerkit.config import ConfigError, load_config
from routerkit.config.build import add_plugin_path
from routerkit.costs import LatencyCost, create_cost, list_costs
from routerkit.models import ToySegmenter, Zoo
from routerkit.training.finetune import JointFineTuning
from routerkit.training.runner import load_run, train

ROOT = Path(__file__).resolve().parents[2]
BATTERY = ROOT / "examples" / "battery.yaml"


class Broken(nn.Module):
    """A model that must never run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        raise AssertionError("forward ran although the seconds were given")


class Recording(nn.Module):
    """A model that records how it was called, then does ``work`` chained matmuls (far more work: slower)."""

    def __init__(self, work: int = 0, size: int = 192) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.dropout = nn.Dropout(0.5)
        self.weight = nn.Parameter(torch.randn(size, size) / size**0.5)
        self.work = work
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(
            {
                "shape": tuple(x.shape),
                "training": self.training,
                "dropout_training": self.dropout.training,
                "inference_mode": torch.is_inference_mode_enabled(),
            }
        )
        h = self.weight
        for _ in range(self.work):
            h = torch.tanh(h @ self.weight)
        return self.conv(x) + h.mean()


@pytest.fixture
def zoo3() -> Zoo:
    return Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=8), ToySegmenter(width=4)])


def test_latency_is_registered() -> None:
    assert "latency" in list_costs()
    cost = create_cost("latency", repeats=3)
    assert isinstance(cost, LatencyCost) and cost.repeats == 3


def test_given_seconds_are_normalised_as_eq3(zoo3: Zoo) -> None:
    seconds = [1e-5, 3e-5, 1e-4]
    costs = LatencyCost(seconds=seconds).costs(zoo3, (1, 8, 8))
    denom = seconds[1] + seconds[2]
    assert costs.dtype == torch.float32 and costs.shape == (3,)
    assert costs.tolist() == pytest.approx([s / denom for s in seconds], rel=1e-6)
    assert costs[1:].sum().item() == pytest.approx(1.0, abs=1e-6)
    zero = LatencyCost(base_cost="zero", seconds=seconds).costs(zoo3, (1, 8, 8))
    assert zero[0].item() == 0.0
    assert torch.equal(zero[1:], costs[1:])


def test_given_seconds_are_used_without_any_forward() -> None:
    zoo = Zoo([Broken(), Broken()])
    cost = LatencyCost(seconds=[0, 2e-3])  # an int is a number of seconds too
    assert cost.measure(zoo, (1, 4, 4)) == {}  # nothing measured: nothing to record
    assert cost.costs(zoo, (1, 4, 4)).tolist() == [0.0, 1.0]
    assert cost.config() == {"base_cost": "share", "batch_size": 32, "repeats": 7, "warmup": 2, "seconds": [0.0, 2e-3]}
    assert "given in cost.params.seconds" in cost.describe(zoo.names)


def test_measuring_runs_batched_forwards_in_eval_and_inference_mode() -> None:
    fast, slow = Recording(work=0), Recording(work=60)
    zoo = Zoo({"fast": fast, "slow": slow})
    zoo.train()
    rng = torch.get_rng_state()
    cost = LatencyCost(batch_size=5, repeats=3, warmup=1)
    measured = cost.measure(zoo, (1, 6, 4))
    assert set(measured) == {"seconds"} and len(measured["seconds"]) == 2
    for model in (fast, slow):
        assert len(model.calls) == 1 + 3  # warmup + repeats, each one batched forward
        assert all(c["shape"] == (5, 1, 6, 4) for c in model.calls)
        assert not any(c["training"] or c["dropout_training"] for c in model.calls)
        assert all(c["inference_mode"] for c in model.calls)
        assert model.training and model.dropout.training  # the train/eval flags are restored
    assert torch.equal(torch.get_rng_state(), rng)  # the random units do not move the global RNG
    # Measured once: later calls reuse the numbers, and config() reports them.
    assert cost.measure(zoo, (1, 6, 4)) == {}
    raw = cost.costs(zoo, (1, 6, 4))
    assert len(fast.calls) == len(slow.calls) == 4
    assert cost.config()["seconds"] == measured["seconds"]
    # Sixty chained 192 x 192 matmuls against none: the slower model is priced higher.
    assert measured["seconds"][1] > measured["seconds"][0] > 0
    assert raw[1].item() == pytest.approx(1.0) and raw[0].item() < 1.0
    assert "measured on cpu" in cost.describe(zoo.names) and "slow" in cost.describe(zoo.names)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"batch_size": 0}, "cost.params.batch_size"),
        ({"batch_size": 2.5}, "cost.params.batch_size"),
        ({"repeats": 0}, "cost.params.repeats"),
        ({"repeats": True}, "cost.params.repeats"),
        ({"warmup": -1}, "cost.params.warmup"),
        ({"seconds": [1e-3, -1e-3]}, "cost.params.seconds"),
        ({"seconds": [1e-3, float("nan")]}, "cost.params.seconds"),
        ({"seconds": [1e-3, float("inf")]}, "cost.params.seconds"),
        ({"seconds": "fast"}, "cost.params.seconds"),
        ({"seconds": 1e-3}, "cost.params.seconds"),
        ({"seconds": [1e-3, "x"]}, "cost.params.seconds"),
        ({"base_cost": "free"}, "base_cost"),
    ],
)
def test_bad_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        LatencyCost(**params)


def test_seconds_of_another_length_name_the_field_and_the_length(zoo3: Zoo) -> None:
    cost = LatencyCost(seconds=[1e-3, 2e-3])
    with pytest.raises(ValueError, match=r"cost\.params\.seconds to hold 3 values .* but got 2"):
        cost.costs(zoo3, (1, 8, 8))


def _battery(*extra: str):  # type: ignore[no-untyped-def]
    add_plugin_path(BATTERY.parent)
    latency = ["cost.name=latency", "cost.params.batch_size=4", "cost.params.repeats=2", "cost.params.warmup=1"]
    return load_config(BATTERY, [*tiny_battery(), *latency, *extra])


def test_a_config_with_seconds_of_another_length_is_refused_naming_the_field() -> None:
    from routerkit.config.build import build_experiment

    with pytest.raises(ConfigError, match=r"cost\.params\.seconds to hold 3 values"):
        build_experiment(_battery("cost.params.seconds=[0.001, 0.002]"))
    with pytest.raises(ConfigError, match=r"cost\.params\.seconds"):
        build_experiment(_battery("cost.params.seconds=[0.001, -0.002, 0.003]"))


def test_a_trained_run_reuses_its_measured_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[float] = []
    real = costs_mod._seconds_per_unit

    def recording(*args: Any, **kwargs: Any) -> float:
        measured.append(real(*args, **kwargs))
        return measured[-1]

    original_epoch = JointFineTuning.run_epoch

    def crash(self: JointFineTuning, epoch: int) -> dict[str, float]:
        raise KeyboardInterrupt

    monkeypatch.setattr(costs_mod, "_seconds_per_unit", recording)
    monkeypatch.setattr(JointFineTuning, "run_epoch", crash)
    cfg = _battery()
    out = io.StringIO()
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed in the last stage, after the policy trained on the costs
        train(cfg, run_dir=run_dir, plugin_dirs=[str(BATTERY.parent)], console=Console(file=out, width=300))
    assert len(measured) == 3  # once per model
    assert "seconds" not in cfg.cost.params  # the caller's config is left as it was
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["cost"]
    assert saved["name"] == "latency" and saved["params"]["seconds"] == measured  # exactly, through YAML
    assert "f0_small" in out.getvalue() and " ms" in out.getvalue() and "measured on cpu" in out.getvalue()

    def no_timing(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("timed again instead of reusing the run's seconds")

    monkeypatch.setattr(costs_mod, "_seconds_per_unit", no_timing)
    monkeypatch.setattr(JointFineTuning, "run_epoch", original_epoch)
    out = io.StringIO()
    train(None, resume=run_dir, console=Console(file=out, width=300))  # type: ignore[arg-type]
    assert "Resuming" in out.getvalue() and "measured on" not in out.getvalue()
    exp = load_run(run_dir)
    expected = LatencyCost(seconds=measured).costs(exp.zoo, exp.pipeline.unit_shape)
    assert torch.equal(exp.pipeline.costs, expected)
    assert exp.pipeline.cost_model.config()["seconds"] == measured
    assert exp.config.cost.params["seconds"] == measured
    for command in (["evaluate", str(run_dir)], ["calibrate", str(run_dir), "--target-share", "0.5"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cost"] == saved  # nothing rewrote it
