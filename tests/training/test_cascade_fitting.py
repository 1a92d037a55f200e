"""The optimal-stopping cascade trained jointly with its classifiers (``training.cascade.joint``).

A toy with a known answer where joint training must beat the policy-only fit, resume exactness
(stage-level and through the runner), frozen models, and the recipe's and config's checks.
"""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import pytest
import torch
from _tiny import tiny_battery
from rich.console import Console
from safetensors.torch import load_file
from torch import Tensor, nn

from routerkit import PatchGrid, RoutedPipeline, WholeInput, Zoo
from routerkit.config import ConfigError, load_config
from routerkit.config.build import add_plugin_path, build_experiment
from routerkit.config.checks import config_problems
from routerkit.data import Split
from routerkit.models import ToySegmenter
from routerkit.rewards import Correctness, UnitIoU
from routerkit.routers import OptimalStoppingCascade
from routerkit.training import runner as run_mod
from routerkit.training.cascade_fitting import CascadeFitting, JointCascadeTraining
from routerkit.training.checkpoint import load_checkpoint, save_checkpoint
from routerkit.training.recipe import build_stages
from routerkit.training.schedules import StageSettings, global_rng_state, set_global_rng_state

ROOT = Path(__file__).resolve().parents[2]
BATTERY = ROOT / "examples" / "battery.yaml"
K = 2
ALPHA = 0.05

# --- the toy: two input types, f_0 perfect on type A and useless on B, f_1 linear ---------------------------------


class TypeAExpert(nn.Module):
    """f_0: confidently right on type A (``x[:, 2] == 0``, label ``x[:, 0] > 0``), uniform on type B (high entropy)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 2)  # carries the parameters the cost model counts; does not change the output

    def forward(self, x: Tensor) -> Tensor:
        confident = 8.0 * (nn.functional.one_hot((x[:, 0] > 0).long(), K).float() - 0.5)
        logits = torch.where((x[:, 2] < 0.5).unsqueeze(1), confident, torch.zeros_like(confident))
        return logits + 0.0 * self.hidden(x).sum(1, keepdim=True)


class LinearClassifier(nn.Module):
    """f_1: a linear classifier; it cannot fit both types' rules at once (``x[:, 0] > 0`` on A, ``x[:, 1] > 0`` on B)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, K)
        self.pad = nn.Linear(4, 16)  # makes f_1 the costlier model; does not change the output

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + 0.0 * self.pad(x).sum(1, keepdim=True)


def two_types(n: int, seed: int) -> Split:
    """Inputs ``[n, 4]``: ``x[:, 2]`` the type (A = 0, B = 1, alternating), label ``x[:, 0] > 0`` on A, ``x[:, 1] > 0`` on B."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    kind = (torch.arange(n) % 2).float()
    x[:, 2] = kind
    return Split(x, torch.where(kind < 0.5, x[:, 0] > 0, x[:, 1] > 0).long())


def toy_cascade(train: Split) -> tuple[RoutedPipeline, OptimalStoppingCascade]:
    """The toy zoo with f_1 pre-trained on both types (its best single line: ~75% on each) and the policy-only fit."""
    torch.manual_seed(0)
    f1 = LinearClassifier()
    opt = torch.optim.Adam(f1.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(f1(train.images), train.targets).backward()
        opt.step()
    pipe = RoutedPipeline(Zoo([TypeAExpert(), f1]).eval(), WholeInput(), "softmax_entropy", "param_share", (4,))
    router = OptimalStoppingCascade(2, in_channels=K + 1, spatial=False)
    fit = CascadeFitting(
        pipe, router, Correctness(K), train, StageSettings(1, 3e-2, 64), 0, num_classes=K, alpha=ALPHA, policy_epochs=200
    )
    fit.train_epoch(0)
    return pipe, router


@torch.no_grad()
def scores(pipe: RoutedPipeline, router: OptimalStoppingCascade, test: Split) -> dict[str, float]:
    """Live accuracy overall and on type B, and the share of each type forwarded to f_1."""
    out = pipe.route(test.images, router.eval())
    correct, forwarded, b = (out.pred == test.targets).float(), (out.actions[:, 0] == 1).float(), test.images[:, 2] > 0.5
    return {
        "acc": float(correct.mean()),
        "acc_b": float(correct[b].mean()),
        "fwd_a": float(forwarded[~b].mean()),
        "fwd_b": float(forwarded[b].mean()),
    }


@pytest.mark.parametrize("loss", ["ce", "acc"])
def test_joint_training_beats_the_policy_only_cascade_on_a_specialising_classifier(loss: str) -> None:
    train, test = two_types(512, 1), two_types(1000, 2)
    pipe, router = toy_cascade(train)
    policy_only = scores(pipe, router, test)
    # The policy-only cascade already routes right: A stops at f_0, B goes on to f_1 (better than f_0's coin flip) ...
    assert policy_only["fwd_b"] >= 0.95 and policy_only["fwd_a"] <= 0.05, policy_only
    # ... where f_1, fitted to both types, is right on only ~77% of B (measured: acc 0.885, acc_b 0.770).
    assert 0.6 < policy_only["acc_b"] < 0.85, policy_only

    joint_pipe, joint_router = copy.deepcopy(pipe), copy.deepcopy(router)
    f1_before = copy.deepcopy(pipe.zoo[1].state_dict())
    stage = JointCascadeTraining(
        joint_pipe,
        joint_router,
        Correctness(K),
        train,
        StageSettings(10, 1e-2, 64),
        1,
        alpha=ALPHA,
        loss=loss,
        classifier_lr=0.05,
    )
    for epoch in range(10):
        logs = stage.train_epoch(epoch)
    joint = scores(joint_pipe, joint_router, test)
    # f_1 is trained on what the policy forwards (B) and specialises: measured acc 0.989 / 0.970 (ce / acc), acc_b 0.978 / 0.940.
    assert joint["fwd_b"] >= 0.95 and joint["fwd_a"] <= 0.05, joint
    assert joint["acc_b"] >= policy_only["acc_b"] + 0.15, (joint, policy_only)
    assert 1 - joint["acc"] <= (1 - policy_only["acc"]) / 3, (joint, policy_only)
    assert logs["charts/stop_at_f1"] == pytest.approx(0.5, abs=0.05) and 0 < logs["fit/iou"] <= 1
    # The policy-only cascade's zoo is untouched (compare trains the joint variant on a copy).
    assert all(torch.equal(v, f1_before[k]) for k, v in pipe.zoo[1].state_dict().items())


def test_without_the_classifier_term_joint_training_does_not_specialise() -> None:
    """The gain above comes from training f_1: with f_1 frozen the joint stage stays at the policy-only accuracy."""
    train, test = two_types(512, 1), two_types(1000, 2)
    pipe, router = toy_cascade(train)
    policy_only = scores(pipe, router, test)
    f1_before = copy.deepcopy(pipe.zoo[1].state_dict())
    stage = JointCascadeTraining(pipe, router, Correctness(K), train, StageSettings(10, 1e-2, 64), 1, alpha=ALPHA, frozen=[1])
    assert stage.trained == [] and list(stage.optimizers) == ["router"]
    for epoch in range(10):
        stage.train_epoch(epoch)
    assert all(torch.equal(v, f1_before[k]) for k, v in pipe.zoo[1].state_dict().items())
    assert scores(pipe, router, test)["acc"] == pytest.approx(policy_only["acc"], abs=0.02)


# --- resume: a killed and resumed joint stage ends bit-identical to an uninterrupted one ---------------------------


def _seg_stage(seed: int = 0) -> tuple[JointCascadeTraining, RoutedPipeline, OptimalStoppingCascade]:
    """Three dropout segmenters (MC-dropout state, dropout in training), patches, an unfitted cascade."""
    torch.manual_seed(seed)
    zoo = Zoo([ToySegmenter(1, 3, width=2, dropout=0.3), ToySegmenter(1, 3, width=4, dropout=0.2), ToySegmenter(1, 3, width=8)])
    pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 8, 8))
    router = OptimalStoppingCascade(3, grid_shape=(2, 2), in_channels=4)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(12, 1, 8, 8, generator=gen)
    data = Split(images, (images[:, 0] * 3).long().clamp(0, 2))
    stage = JointCascadeTraining(pipe, router, UnitIoU(3), data, StageSettings(3, 1e-2, 4), 7, alpha=0.1, classifier_lr=1e-2)
    return stage, pipe, router


def _weights(pipe: RoutedPipeline, router: OptimalStoppingCascade) -> dict[str, Tensor]:
    return {
        **{f"zoo.{k}": v.clone() for k, v in pipe.zoo.state_dict().items()},
        **{f"router.{k}": v.clone() for k, v in router.state_dict().items()},
    }


def test_joint_stage_resumes_bit_identically(tmp_path: Path) -> None:
    straight, pipe_a, router_a = _seg_stage()
    logs_a = [straight.train_epoch(epoch) for epoch in range(3)]
    first, pipe_0, router_0 = _seg_stage()
    before = _weights(pipe_0, router_0)
    logs_0 = first.train_epoch(0)
    changed = {".".join(k.split(".")[:3]) for k, v in _weights(pipe_0, router_0).items() if not torch.equal(v, before[k])}
    assert changed == {"zoo.members.1", "zoo.members.2", "router.policies.0", "router.policies.1"}, changed  # not f_0
    # what the runner's checkpoint holds: the models, the stage (optimisers, generator) and the global RNG (dropout)
    save_checkpoint(
        tmp_path,
        "joint-e0000",
        {"model": _weights(pipe_0, router_0), "stage": first.state_dict(), "rng": global_rng_state()},
        {"epoch": 0},
    )
    torch.manual_seed(123)  # a new process: other global RNG state, fresh models
    resumed, pipe_b, router_b = _seg_stage(seed=99)
    state, meta = load_checkpoint(tmp_path)
    resumed.load_state_dict(state["stage"])
    pipe_b.zoo.load_state_dict({k[len("zoo.") :]: v for k, v in state["model"].items() if k.startswith("zoo.")})
    router_b.load_state_dict({k[len("router.") :]: v for k, v in state["model"].items() if k.startswith("router.")})
    set_global_rng_state(state["rng"])
    logs_b = [logs_0] + [resumed.train_epoch(epoch) for epoch in range(meta["epoch"] + 1, 3)]
    assert logs_a == logs_b
    a, b = _weights(pipe_a, router_a), _weights(pipe_b, router_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cfg(*extra: str):  # type: ignore[no-untyped-def]
    add_plugin_path(BATTERY.parent)
    joint = [
        "router.name=optimal_stopping",
        "router.params={}",
        "training.pretrain_large.epochs=0",  # the joint stage is under test: random classifiers do
        "training.pretrain_base.epochs=0",
        "training.cascade.policy_epochs=2",
        "training.cascade.joint=true",
        "training.cascade.joint_epochs=3",
        "training.cascade.joint_lr=0.01",
        "evaluation.baselines=[]",
    ]
    return load_config(BATTERY, [*tiny_battery(), *joint, *extra])


def test_a_killed_joint_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = Console(file=io.StringIO())
    run_mod.train(_cfg(), run_dir=tmp_path / "straight", console=quiet)
    original = JointCascadeTraining.run_epoch

    def killed(self: JointCascadeTraining, epoch: int) -> dict[str, float]:
        if epoch == 2:  # epochs 0 and 1 are checkpointed
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(JointCascadeTraining, "run_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run_mod.train(_cfg(), run_dir=tmp_path / "killed", console=quiet)
    assert load_checkpoint(tmp_path / "killed")[1]["stage"] == "fit_cascade_joint"
    monkeypatch.setattr(JointCascadeTraining, "run_epoch", original)
    run_mod.train(None, resume=tmp_path / "killed", console=quiet)  # type: ignore[arg-type]
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = build_experiment(_cfg()).zoo.state_dict()  # the run's classifiers did change, f_0 did not
    trained = load_checkpoint(tmp_path / "straight", "final")[0]["model"]["zoo"]
    changed = {k.split(".")[1] for k, v in trained.items() if not torch.equal(v, fresh[k])}
    assert changed == {"1", "2"}, changed  # members.<index>


# --- the recipe and the config -------------------------------------------------------------------------------------


def test_the_recipe_adds_the_joint_stage_and_leaves_frozen_models_out() -> None:
    with pytest.warns(UserWarning, match="zoo.models.1.train is false"):
        stages = build_stages(build_experiment(_cfg("zoo.models.1.train=false")))
    *_, fit, joint = stages
    assert isinstance(fit, CascadeFitting) and isinstance(joint, JointCascadeTraining)
    assert joint.name == "fit_cascade_joint" and joint.settings.epochs == 3
    assert joint.trained == [2] and joint.frozen == {1} and sorted(joint.optimizers) == ["model:f2_large", "router"]
    assert joint.optimizers["model:f2_large"].param_groups[0]["lr"] == 0.01
    assert not [
        s for s in build_stages(build_experiment(_cfg("training.cascade.joint=false"))) if isinstance(s, JointCascadeTraining)
    ]


def test_joint_training_of_another_cascade_is_a_config_error_naming_the_field() -> None:
    message = r"training\.cascade\.joint: joint training is for the optimal-stopping cascade.*'idk' \(IDKCascade\)"
    with pytest.raises(ConfigError, match=message):
        build_stages(build_experiment(_cfg("router.name=idk")))
    # routerkit validate finds it without data
    assert [
        p
        for p in config_problems(_cfg("router.name=idk"), data_factory=False, build_models=False, device=False)
        if re.match(message, p)
    ]
    assert not config_problems(_cfg(), data_factory=False, build_models=False, device=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.cascade.joint_epochs=0", r"training\.cascade\.joint_epochs: Expected a value greater than or equal to 1"),
        ("training.cascade.joint_lr=0", r"training\.cascade\.joint_lr: Expected a value greater than 0"),
        ("training.cascade.joint=maybe", r"training\.cascade\.joint: Expected a valid boolean"),
        ("training.cascade.joint_rate=1", r"training\.cascade\.joint_rate: unknown field"),
        ("compare.stop_joint_epochs=-1", r"compare\.stop_joint_epochs: Expected a value greater than or equal to 0"),
    ],
)
def test_joint_settings_are_checked_by_the_schema(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(override)


def test_the_stage_refuses_what_it_cannot_train() -> None:
    stage, pipe, router = _seg_stage()
    with pytest.raises(ValueError, match="needs an OptimalStoppingCascade but got IDKCascade"):
        from routerkit.routers import IDKCascade

        JointCascadeTraining(pipe, IDKCascade(3, grid_shape=(2, 2)), UnitIoU(3), stage.data, stage.settings, 0)
    with pytest.raises(ValueError, match="Expected loss 'ce' or 'acc' but got 'mse'"):
        JointCascadeTraining(pipe, router, UnitIoU(3), stage.data, stage.settings, 0, loss="mse")


# --- compare: the joint cascade's row beside the policy-only one, on a copy of the zoo -----------------------------

COMPARE_TINY = ["compare.pareto=false", "compare.stop_epochs=2", "compare.idk_grid_steps=3", "training.policy.epochs=1"]


def test_compare_reports_the_joint_cascade_beside_the_policy_only_one() -> None:
    from routerkit.compare import compare_strategies, table1_markdown
    from routerkit.compare.harness import joint_stopping
    from routerkit.compare.results import OPTIMAL_STOPPING, OPTIMAL_STOPPING_JOINT

    exp = build_experiment(_cfg(*COMPARE_TINY, "compare.stop_joint_epochs=2", "compare.stop_alpha=0.05"))
    zoo_before = {k: v.clone() for k, v in exp.zoo.state_dict().items()}
    report = compare_strategies(exp, exp.config.compare, Console(file=io.StringIO()))
    keys = [row.key for row in report.rows]
    assert keys.index(OPTIMAL_STOPPING_JOINT) == keys.index(OPTIMAL_STOPPING) + 1
    joint, policy_only = report.row(OPTIMAL_STOPPING_JOINT), report.row(OPTIMAL_STOPPING)
    assert joint.name == "Optimal stopping (joint, alpha=0.05)" and joint.kind == "cascade"
    assert sum(joint.result.usage) == pytest.approx(1.0) and sum(map(sum, joint.assignment)) == 4 * 16
    assert f"| {joint.name} | {joint.result.mean_iou:.4f} |" in table1_markdown(report)
    # The run's zoo is untouched: every other row, the policy-only cascade included, is scored on it.
    assert all(torch.equal(v, zoo_before[k]) for k, v in exp.zoo.state_dict().items())
    settings = exp.config.compare.model_copy(update={"stop_joint_epochs": 0})
    without = compare_strategies(exp, settings, Console(file=io.StringIO()))
    assert OPTIMAL_STOPPING_JOINT not in [row.key for row in without.rows]
    assert without.row(OPTIMAL_STOPPING).result.mean_iou == policy_only.result.mean_iou  # the joint row changes no other row
    # What the joint row ran: its own copy of the zoo, f_1 and f_2 trained, f_0 as in the run; the run's cascade untouched.
    policy_cascade = OptimalStoppingCascade(3, grid_shape=(4, 4), in_channels=exp.data.num_classes + 1)
    policy_before = {k: v.clone() for k, v in policy_cascade.state_dict().items()}
    pipeline, cascade = joint_stopping(exp, policy_cascade, 0.05, 1)
    assert pipeline.zoo is not exp.zoo and cascade is not policy_cascade
    changed = {k.split(".")[1] for k, v in pipeline.zoo.state_dict().items() if not torch.equal(v, zoo_before[k])}
    assert changed == {"1", "2"} and all(torch.equal(v, zoo_before[k]) for k, v in exp.zoo.state_dict().items())
    assert all(torch.equal(v, policy_before[k]) for k, v in policy_cascade.state_dict().items())
