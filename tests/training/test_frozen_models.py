"""Frozen models (``zoo.models[].train: false``): untouched by every stage, their pre-training stages not built."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from _tiny import tiny_battery
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from routerkit.config import load_config
from routerkit.config.build import add_plugin_path, build_experiment
from routerkit.data import Split
from routerkit.models import UNet, Zoo
from routerkit.partitioners import PatchGrid
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import Correctness, PaSeRReward
from routerkit.routers import create_router
from routerkit.training import runner as run_mod
from routerkit.training.checkpoint import load_checkpoint
from routerkit.training.finetune import JointFineTuning
from routerkit.training.pretraining import LargeModelPretraining, PretrainChecks
from routerkit.training.recipe import build_stages, frozen_summary, skipped_stages
from routerkit.training.schedules import StageSettings

ROOT = Path(__file__).resolve().parents[2]
BATTERY = ROOT / "examples" / "battery.yaml"
NAMES = ("f0_small", "f1_medium", "f2_large")


def _cfg(*extra: str):  # type: ignore[no-untyped-def]
    add_plugin_path(BATTERY.parent)
    return load_config(BATTERY, [*tiny_battery(), *extra])


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` moved away from any fresh initialisation (batch-norm statistics and counters included)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + torch.rand(v.shape, generator=gen) if v.is_floating_point() else v + 5).contiguous() for k, v in state.items()
    }


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One safetensors file per model of the tiny battery zoo, with weights no run starts from."""
    folder = tmp_path_factory.mktemp("weights")
    exp = build_experiment(_cfg())
    files = {}
    for i, (name, model) in enumerate(zip(exp.zoo.names, exp.zoo, strict=True)):
        files[name] = folder / f"{name}.safetensors"
        save_file(_perturbed(model.state_dict(), seed=i), files[name])
    return files


def _frozen(files: dict[str, Path], *indices: int) -> list[str]:
    return [item for i in indices for item in (f"zoo.models.{i}.weights={files[NAMES[i]]}", f"zoo.models.{i}.train=false")]


def _train(cfg, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, torch.Tensor], list[dict]]:  # type: ignore[no-untyped-def]
    """Train ``cfg`` (no evaluation: not what these tests check); the console output, the final zoo state, the log rows."""
    monkeypatch.setattr(run_mod, "evaluate_experiment", lambda *args, **kwargs: [])
    out = io.StringIO()
    run_mod.train(cfg, run_dir=run_dir, console=Console(file=out, width=400))
    state, _ = load_checkpoint(run_dir, "final")
    rows = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    return out.getvalue(), state["model"]["zoo"], rows


def _same(zoo_state: dict[str, torch.Tensor], index: int, file: Path) -> bool:
    saved = load_file(file)
    prefix = f"members.{index}."
    own = {k.removeprefix(prefix): v for k, v in zoo_state.items() if k.startswith(prefix)}
    return set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)


def test_an_all_frozen_zoo_trains_only_the_router(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight_files: dict[str, Path]
) -> None:
    cfg = _cfg(*_frozen(weight_files, 0, 1, 2))
    assert skipped_stages(cfg) == ["pretrain_large", "pretrain_base"]
    printed, zoo_state, rows = _train(cfg, tmp_path / "run", monkeypatch)
    assert {r["stage"] for r in rows} == {"policy", "finetune"}
    assert not any(k.startswith("losses/ce_") for r in rows for k in r)  # no model took a step
    assert not list((tmp_path / "run" / "checkpoints").glob("*pretrain*"))
    line = (
        "frozen models (zoo.models[].train: false): f0_small, f1_medium, f2_large; "
        "stages skipped: pretrain_large, pretrain_base (every model they train is frozen)"
    )
    assert line in printed
    # The final checkpoint holds every model, bit-identical to its file: the run directory stands alone.
    assert all(_same(zoo_state, i, weight_files[name]) for i, name in enumerate(NAMES))


def test_f0_still_trains_with_frozen_large_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight_files: dict[str, Path]
) -> None:
    cfg = _cfg(*_frozen(weight_files, 1, 2), f"zoo.models.0.weights={weight_files['f0_small']}")
    printed, zoo_state, rows = _train(cfg, tmp_path / "run", monkeypatch)
    assert {r["stage"] for r in rows} == {"pretrain_base", "policy", "finetune"}
    assert all(r["losses/kd_f0"] > 0 for r in rows if r["stage"] == "pretrain_base")  # the frozen f_2 still teaches
    assert "frozen models (zoo.models[].train: false): f1_medium, f2_large; stages skipped: pretrain_large (" in printed
    assert _same(zoo_state, 1, weight_files["f1_medium"]) and _same(zoo_state, 2, weight_files["f2_large"])
    assert not _same(zoo_state, 0, weight_files["f0_small"])  # f_0 started from its file and trained


def test_frozen_without_weights_warns_and_the_stages_follow_the_flags(weight_files: dict[str, Path]) -> None:
    exp = build_experiment(_cfg("zoo.models.1.train=false"))
    with pytest.warns(UserWarning, match=r"zoo\.models\.1\.train is false but zoo\.models\.1\.weights is not set: model "):
        stages = build_stages(exp)
    assert [s.name for s in stages] == ["pretrain_large", "pretrain_base", "policy", "finetune"]
    assert stages[0].trained == [2] and list(stages[0].optimizers) == ["f2_large"]  # type: ignore[attr-defined]
    assert stages[3].trained == [2] and "f1_medium" not in stages[3].optimizers  # type: ignore[attr-defined]
    assert not any(p.requires_grad for p in exp.zoo[1].parameters())
    assert all(p.requires_grad for p in exp.zoo[2].parameters())
    assert frozen_summary(exp.config) == "frozen models (zoo.models[].train: false): f1_medium; stages skipped: none"
    exp = build_experiment(_cfg())
    assert frozen_summary(exp.config) is None and skipped_stages(exp.config) == []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_stages(build_experiment(_cfg(*_frozen(weight_files, 2))))  # frozen with weights: no warning


def _small_setup() -> tuple[RoutedPipeline, Split]:
    torch.manual_seed(0)
    zoo = Zoo([UNet(1, 2, 1, 1, dropout=0.1), UNet(1, 2, 2, 1), UNet(1, 2, 3, 1)])
    pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "softmax_entropy", "param_share", (1, 8, 8))
    images = torch.rand(8, 1, 8, 8)
    return pipe, Split(images, (images[:, 0] > 0.5).long())


def _states(zoo: Zoo) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in zoo]


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stages_leave_a_frozen_model_bit_identical_batch_norm_included() -> None:
    pipe, data = _small_setup()
    before = _states(pipe.zoo)
    checks = PretrainChecks(validation=data, num_classes=2, precise_bn=True, keep_best=True, batch_size=4)
    stage = LargeModelPretraining(pipe, data, StageSettings(2, 0.05, 4), seed=0, checks=checks, frozen=[1])
    logs = [stage.train_epoch(e) for e in range(2)]
    assert _unchanged(pipe.zoo[1], before[1]) and not _unchanged(pipe.zoo[2], before[2])
    assert stage.num_steps() == 2 and set(stage.modules) == {"f2"}
    assert not any(k.endswith("_f1") for row in logs for k in row) and "losses/ce_f2" in logs[0]
    assert not any(p.requires_grad for p in pipe.zoo[1].parameters())
    router = create_router("paser", router_spec=pipe.router_spec(2, True), width=4)
    before = _states(pipe.zoo)
    finetune = JointFineTuning(
        pipe,
        router,  # type: ignore[arg-type]
        PaSeRReward(0.1),
        Correctness(2),
        data,
        StageSettings(1, 0.05, 4),
        seed=0,
        large_on="all",
        freeze_bn=False,  # batch-norm statistics recomputed after the epoch: for the trained models only
        frozen=[1],
    )
    logs = [finetune.train_epoch(0)]
    assert _unchanged(pipe.zoo[1], before[1]) and not _unchanged(pipe.zoo[2], before[2])
    assert "losses/ce_f2" in logs[0] and "losses/ce_f1" not in logs[0]
    assert set(finetune.optimizers) == {"router", "f2"}
    with pytest.raises(ValueError, match=r"Expected frozen model indices in 0\.\.2 but got \[3\]"):
        LargeModelPretraining(pipe, data, StageSettings(1, 0.05, 4), seed=0, frozen=[3])
