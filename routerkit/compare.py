"""One harness comparing every strategy on the same trained zoo, data and cost accounting.

`compare_strategies` evaluates PaSeR, the IDK cascade (grid search and IoU-match mode), the
optimal-stopping cascade, the random policy, each single model and the oracle on one split,
and writes the PaSeR paper's Table 1 (IoU, GFLOPs, IoU/GigaFlop), Table 2 (IDK in IoU-match
mode against PaSeR), each router's model-assignment confusion matrix against the oracle and a
cost/quality Pareto figure. The frozen zoo runs once per split (`routerkit.replay`); every
sweep point (PaSeR over lambda, IDK over thresholds, optimal stopping over alpha, the oracle
over lambda) is trained and scored on replayed outputs in seconds.

Table 1 comes from live routed inference (`evaluate_router`: real execution, real FLOP
accounting). Rewards, assignment matrices and the Pareto sweep come from the replayed table
of the same split, where the base model's MC-dropout draw is fixed, so every strategy sees the
same state.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from routerkit.config.build import Experiment
from routerkit.config.schema import CompareConfig
from routerkit.flops import FLOP_CONVENTION
from routerkit.metrics import EvalResult, evaluate_router, seeded_rng
from routerkit.replay import UnitTable, build_unit_table, decide, routed_flops
from routerkit.rewards import PaSeRReward
from routerkit.routers import (
    IDKCascade,
    OptimalStoppingCascade,
    OracleRouter,
    PaSeRRouter,
    RandomRouter,
    Router,
    SingleModelRouter,
)
from routerkit.training.checkpoint import atomic_write_bytes, atomic_write_json
from routerkit.training.runner import policy_stage


@dataclass
class StrategyRow:
    """One strategy of Table 1.

    Attributes:
        name: Display name.
        kind: ``pick-first``, ``cascade``, ``baseline`` or ``oracle``.
        result: Live evaluation on the split.
        mean_reward: Mean per-unit PaSeR reward of its decisions on the replayed split.
        oracle_gain_share: ``(R - R_f0) / (R_oracle - R_f0)``: share of the oracle's reward gain over f_0 alone.
        assignment: ``[A, A]`` counts, rows = the oracle's model, columns = this strategy's.
        agreement: Share of units where it chose the oracle's model.
        expert_assignment: ``[A, A]`` counts against the data's expert labels (``evaluation.expert_key``):
            rows = the model that should answer, columns = this strategy's model; ``None`` without labels.
        expert_accuracy: Model-assignment accuracy against the expert labels.
    """

    name: str
    kind: str
    result: EvalResult
    mean_reward: float
    oracle_gain_share: float
    assignment: list[list[int]]
    agreement: float
    expert_assignment: list[list[int]] | None = None
    expert_accuracy: float | None = None


@dataclass
class ParetoPoint:
    """One point of the cost/quality sweep (replayed split)."""

    family: str
    parameter: str
    value: float
    mean_iou: float
    gflops: float
    usage: list[float]


@dataclass
class TVDPoint:
    """PaSeR fine-tuned from the lambda = reward.lam policy until a TVD threshold (paper Fig. 12)."""

    threshold: float
    tvd: float
    lam: float
    steps: int
    mean_iou: float
    gflops: float
    usage: list[float]
    expert_accuracy: float | None = None

    @property
    def iou_per_gflop(self) -> float:
        """IoU per GigaFlop."""
        return self.mean_iou / self.gflops if self.gflops > 0 else float("nan")


@dataclass
class CompareReport:
    """Everything `compare_strategies` computed."""

    split: str
    rows: list[StrategyRow]
    table2: dict[str, Any]
    pareto: list[ParetoPoint] = field(default_factory=list)
    model_names: list[str] = field(default_factory=list)
    expert_key: str | None = None
    tvd: list[TVDPoint] = field(default_factory=list)


def _table_point(exp: Experiment, router: Router, table: UnitTable) -> tuple[float, float, list[float]]:
    actions = decide(router, table)
    return table.mean_iou(actions), routed_flops(exp.pipeline, router, table, actions) / 1e9, table.usage(actions)


def train_paser_on_table(
    exp: Experiment, table: UnitTable, lam: float, epochs: int, seed: int, template: PaSeRRouter | None = None
) -> PaSeRRouter:
    """A fresh PaSeR policy trained by REINFORCE on a replayed table with cost weight ``lam``."""
    torch.manual_seed(seed)
    if template is not None:
        router = copy.deepcopy(template).cpu()
        for module in router.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    else:
        router = PaSeRRouter(
            len(exp.zoo),
            exp.pipeline.partitioner.grid_shape,
            exp.data.num_classes + 1,
            spatial=table.base.probs.dim() > 2,
        )
    stage = policy_stage(
        exp,
        router,
        PaSeRReward(lam),
        seed,
        epochs=epochs,
        cache=(table.base.probs, table.base.uncertainty, table.accuracy),
    )
    for epoch in range(epochs):
        stage.train_epoch(epoch)
    return router.eval()


def _assignment(oracle: Tensor, chosen: Tensor, num_actions: int) -> tuple[list[list[int]], float]:
    flat = oracle.reshape(-1) * num_actions + chosen.reshape(-1)
    counts = torch.bincount(flat, minlength=num_actions * num_actions).reshape(num_actions, num_actions)
    return counts.tolist(), float((oracle == chosen).double().mean())


def expert_units(split: Any, key: str, grid_units: int) -> Tensor:
    """Per-unit expert labels ``[N, P]`` from the split's per-input (``[N]``) or per-unit (``[N, P]``) meta ``key``."""
    if key not in split.meta:
        raise ValueError(
            f"evaluation.expert_key is {key!r} but the data plugin's splits carry meta {sorted(split.meta) or 'none'}."
        )
    labels = split.meta[key].long().cpu()
    if labels.dim() == 1:
        return labels.unsqueeze(1).expand(-1, grid_units)
    if labels.dim() == 2 and labels.shape[1] == grid_units:
        return labels
    raise ValueError(f"Expected meta[{key!r}] of shape [N] or [N, {grid_units}] but got {tuple(labels.shape)}.")


def compare_strategies(
    exp: Experiment, settings: CompareConfig, console: Console | None = None, run_dir: str | Path | None = None
) -> CompareReport:
    """Evaluate every strategy on ``exp``'s trained zoo (see the module docstring).

    Args:
        exp: A trained experiment (e.g. from `routerkit.training.load_run`).
        settings: The ``compare`` section of the config.
        console: Where progress is printed.
        run_dir: The run directory (needed by ``settings.tvd_thresholds``: the stage-2 policy checkpoint).

    Returns:
        The report (also see `write_report`).
    """
    console = console or Console()
    cfg, data, pipe = exp.config, exp.data, exp.pipeline
    device = cfg.run.device
    split = data.splits()[settings.split]
    k, num_actions, grid = data.num_classes, len(exp.zoo), pipe.partitioner.grid_shape
    lam = cfg.reward.lam
    reward = PaSeRReward(lam)
    exp.zoo.eval()

    def table_of(part: Any) -> UnitTable:
        with seeded_rng(cfg.run.seed, device):  # the same MC-dropout states at every compare of the run
            return build_unit_table(pipe, exp.accuracy, part, k, settings.batch_size, data.ignore_index, device)

    console.print("Replaying the frozen zoo on the validation, D_RL and evaluation splits ...")
    val_t, rl_t, test_t = table_of(data.val), table_of(exp.parts["rl"]), table_of(split)

    if isinstance(exp.router, PaSeRRouter):
        paser = exp.router
    else:
        console.print("The run's router is not PaSeR: training a PaSeR policy on the replayed D_RL ...")
        paser = train_paser_on_table(exp, rl_t, lam, cfg.training.policy.epochs, cfg.run.seed)
    paser.eval()
    paser_val_iou = val_t.mean_iou(decide(paser.cpu(), val_t))

    idk = IDKCascade(num_actions, grid_shape=grid, in_channels=k + 1)
    idk_fit = idk.fit_grid(val_t, settings.idk_lambda, settings.idk_grid_steps)
    idk_match = IDKCascade(num_actions, grid_shape=grid, in_channels=k + 1)
    match_fit = idk_match.fit_iou(val_t, paser_val_iou)
    stopping = OptimalStoppingCascade(num_actions, grid_shape=grid, in_channels=k + 1)
    stop_alpha = lam if settings.stop_alpha is None else settings.stop_alpha
    stopping.fit(rl_t, stop_alpha, settings.stop_epochs, seed=cfg.run.seed)
    oracle = OracleRouter(num_actions, k, lam, cfg.reward.accuracy, data.ignore_index, grid_shape=grid, in_channels=k + 1)

    strategies: list[tuple[str, str, Router]] = [
        ("PaSeR", "pick-first", paser),
        (f"IDK cascade (grid, lambda_IDK={settings.idk_lambda:g})", "cascade", idk),
        ("IDK cascade (IoU match)", "cascade", idk_match),
        (f"Optimal stopping (alpha={stop_alpha:g})", "cascade", stopping),
        ("PaSeR-RandPol", "baseline", RandomRouter(num_actions, grid_shape=grid, seed=cfg.evaluation.random_seed)),
    ]
    for i, name in enumerate(exp.zoo.names):
        strategies.append((f"{name} alone", "baseline", SingleModelRouter(num_actions, index=i, grid_shape=grid)))
    strategies.append(("Oracle", "oracle", oracle))

    expert_key = cfg.evaluation.expert_key
    experts = expert_units(split, expert_key, test_t.num_units) if expert_key else None
    all_rewards = test_t.rewards(reward)
    oracle_actions = oracle.decide_table(test_t)
    r_oracle = float(test_t.gather(all_rewards, oracle_actions).nanmean())
    r_base = float(all_rewards[..., 0].nanmean())
    rows: list[StrategyRow] = []
    for name, kind, router in strategies:
        router.to(device)
        console.print(f"Evaluating {name} ...")
        result = evaluate_router(
            pipe, router, split, k, name, cfg.evaluation.batch_size, data.ignore_index, device, seed=cfg.run.seed
        )
        router.cpu()
        actions = decide(router, test_t)
        r = float(test_t.gather(all_rewards, actions).nanmean())
        share = (r - r_base) / (r_oracle - r_base) if r_oracle > r_base else float("nan")
        matrix, agreement = _assignment(oracle_actions, actions, num_actions)
        row = StrategyRow(name, kind, result, r, share, matrix, agreement)
        if experts is not None:
            row.expert_assignment, row.expert_accuracy = _assignment(experts, actions.cpu(), num_actions)
        rows.append(row)
    paser.to(device)

    by_name = {row.name: row for row in rows}
    p_row, m_row = by_name["PaSeR"], by_name["IDK cascade (IoU match)"]
    table2 = {
        "target_val_iou": paser_val_iou,
        "idk_val_iou": match_fit["iou"],
        "matched_within_1e-3": bool(match_fit["matched"]),
        "idk_offset_std": match_fit["offset"],
        "paser": {"mean_iou": p_row.result.mean_iou, "gflops": p_row.result.gflops},
        "idk_iou_match": {"mean_iou": m_row.result.mean_iou, "gflops": m_row.result.gflops},
        # A cost ratio means something only at equal quality: None when the IoU match failed.
        "gflops_ratio_idk_over_paser": (
            m_row.result.gflops / p_row.result.gflops if match_fit["matched"] and p_row.result.gflops > 0 else None
        ),
        "idk_grid_fit": idk_fit,
    }
    report = CompareReport(settings.split, rows, table2, [], list(exp.zoo.names), expert_key)
    if settings.pareto:
        report.pareto = pareto_sweep(exp, settings, rl_t, val_t, test_t, paser, console)
    if settings.tvd_thresholds:
        if run_dir is None:
            raise ValueError("compare.tvd_thresholds needs a trained run directory (its stage-2 policy checkpoint).")
        ft_t = table_of(exp.parts["ft"])
        report.tvd = tvd_sweep(exp, Path(run_dir), settings.tvd_thresholds, ft_t, test_t, experts, console)
    return report


def stage_policy(exp: Experiment, run_dir: Path) -> PaSeRRouter:
    """A copy of ``exp``'s router with the weights it had at the end of stage 2 (policy training), read once."""
    from routerkit.training.checkpoint import load_checkpoint

    names = sorted(p.stem for p in (run_dir / "checkpoints").glob("*-policy-e*.json"))
    if not names:
        raise ValueError(f"{run_dir} has no stage-2 policy checkpoint (checkpoints/*-policy-e*.json).")
    state, _ = load_checkpoint(run_dir, names[-1])
    if not isinstance(exp.router, PaSeRRouter):
        raise ValueError(f"The TVD sweep needs a PaSeR router but the run's router is {type(exp.router).__name__}.")
    router = copy.deepcopy(exp.router).cpu()
    router.load_state_dict(state["model"]["router"])
    return router


def tvd_sweep(
    exp: Experiment,
    run_dir: Path,
    thresholds: list[float],
    ft_t: UnitTable,
    test_t: UnitTable,
    experts: Tensor | None,
    console: Console,
) -> list[TVDPoint]:
    """PaSeR Fig. 12: fine-tune the stage-2 policy with the lambda schedule up to each TVD threshold."""
    from routerkit.training.runner import tvd_stage

    if exp.config.training.finetune.lam_end is None:
        raise ValueError("compare.tvd_thresholds needs training.finetune.lam_end (the lambda schedule's end).")
    console.print(f"TVD sweep: fine-tuning the stage-2 policy up to TVD {thresholds} (replayed D_FT) ...")
    points = []
    cache = (ft_t.base.probs, ft_t.base.uncertainty, ft_t.accuracy)
    start = stage_policy(exp, run_dir)
    for threshold in thresholds:
        router = copy.deepcopy(start)
        stage = tvd_stage(exp, router, threshold, exp.config.run.seed + 3, cache)
        for epoch in range(stage.settings.epochs):
            stage.train_epoch(epoch)
            if stage.stopped:
                break
        router.eval()
        actions = decide(router, test_t)
        point = TVDPoint(
            threshold,
            stage.tvd,
            stage.lam,
            stage.step,
            test_t.mean_iou(actions),
            routed_flops(exp.pipeline, router, test_t, actions) / 1e9,
            test_t.usage(actions),
        )
        if experts is not None:
            point.expert_accuracy = float((experts == actions.cpu()).double().mean())
        points.append(point)
    return points


def pareto_sweep(
    exp: Experiment,
    settings: CompareConfig,
    rl_t: UnitTable,
    val_t: UnitTable,
    test_t: UnitTable,
    paser: PaSeRRouter,
    console: Console,
) -> list[ParetoPoint]:
    """Cost/quality points of every family on the replayed evaluation split."""
    num_actions, grid, k = len(exp.zoo), exp.pipeline.partitioner.grid_shape, exp.data.num_classes
    points: list[ParetoPoint] = []

    def add(family: str, parameter: str, value: float, router: Router) -> None:
        iou, gflops, usage = _table_point(exp, router, test_t)
        points.append(ParetoPoint(family, parameter, float(value), iou, gflops, usage))

    console.print(f"Pareto sweep: PaSeR over lambda {settings.sweep_lambdas} (replayed outputs) ...")
    for value in settings.sweep_lambdas:
        router = train_paser_on_table(exp, rl_t, value, settings.sweep_policy_epochs, exp.config.run.seed, paser)
        add("PaSeR", "lambda", value, router)
    idk = IDKCascade(num_actions, grid_shape=grid, in_channels=k + 1)
    for offset in settings.idk_offsets:
        idk.set_thresholds(idk.thresholds_at(val_t, offset))
        add("IDK cascade", "threshold offset (std)", offset, idk)
    for alpha in settings.stop_alphas:
        stopping = OptimalStoppingCascade(num_actions, grid_shape=grid, in_channels=k + 1)
        stopping.fit(rl_t, alpha, settings.stop_epochs, seed=exp.config.run.seed)
        add("Optimal stopping", "alpha", alpha, stopping)
    for i, name in enumerate(exp.zoo.names):
        add(f"{name} alone", "model", i, SingleModelRouter(num_actions, index=i, grid_shape=grid))
    for value in settings.sweep_lambdas:
        add("Oracle", "lambda", value, OracleRouter(num_actions, k, value, exp.config.reward.accuracy, grid_shape=grid))
    return points


def _fmt(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}f}"


def largest_gflops(report: CompareReport) -> float:
    """GFLOPs per input of the largest model alone (the reference of Guan et al.'s "FLOPs %")."""
    for row in report.rows:
        if row.name == f"{report.model_names[-1]} alone":
            return row.result.gflops
    return float("nan")


def table1_markdown(report: CompareReport) -> str:
    """The paper's Table 1 as markdown, with Guan et al.'s error and FLOPs as a percentage of the largest model."""
    names = report.model_names
    head = ["strategy", "mean IoU", "error", "GFLOPs", "FLOPs % of largest", "IoU/GigaFlop", "mean reward", "oracle gain share"]
    head += [f"% {n}" for n in names]
    largest = largest_gflops(report)
    lines = [
        f"Split: {report.split}. GFLOPs per input count every pass that ran ({FLOP_CONVENTION}); "
        f"error = 1 - accuracy (per pixel for segmentation); FLOPs % relative to {names[-1]} alone.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in report.rows:
        r = row.result
        cells = [
            row.name,
            _fmt(r.mean_iou),
            f"{100 * (1 - r.accuracy):.2f}%",
            _fmt(r.gflops),
            f"{100 * r.gflops / largest:.1f}%",
            f"{r.iou_per_gflop:.2f}",
            _fmt(row.mean_reward),
            f"{100 * row.oracle_gain_share:.1f}%",
            *[f"{100 * u:.1f}" for u in r.usage],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table2_markdown(report: CompareReport) -> str:
    """The paper's Table 2 (IDK in IoU-match mode against PaSeR) as markdown.

    The GFLOPs ratio is stated only when the IDK thresholds matched PaSeR's validation IoU; an
    unmatched comparison says so and gives no ratio (the two points differ in quality too).
    """
    t = report.table2
    matched = bool(t["matched_within_1e-3"])
    ratio = t.get("gflops_ratio_idk_over_paser")
    if matched and ratio is not None:
        verdict = f"At matched quality IDK needs {ratio:.2f}x PaSeR's GFLOPs."
    else:
        gap = 100 * (t["idk_val_iou"] - t["target_val_iou"])
        verdict = (
            f"**Not a match**: no IDK threshold reached PaSeR's validation IoU within 1e-3 (the closest is "
            f"{abs(gap):.2f} IoU points {'above' if gap > 0 else 'below'} it), so the two rows differ in quality "
            "as well as in cost and no GFLOPs ratio is given."
        )
    return "\n".join(
        [
            f"IDK thresholds tuned on the validation split to PaSeR's validation IoU {t['target_val_iou']:.4f} "
            f"(reached {t['idk_val_iou']:.4f}, matched within 1e-3: {matched}).",
            "",
            "| strategy | mean IoU | GFLOPs |",
            "|---|---|---|",
            f"| PaSeR | {t['paser']['mean_iou']:.4f} | {t['paser']['gflops']:.4f} |",
            f"| IDK cascade (IoU match) | {t['idk_iou_match']['mean_iou']:.4f} | {t['idk_iou_match']['gflops']:.4f} |",
            "",
            verdict,
            "",
        ]
    )


def assignment_markdown(report: CompareReport) -> str:
    """Each router's model-assignment confusion matrix against the oracle."""
    names = report.model_names
    out = ["Rows: the oracle's model; columns: the strategy's model (units of the replayed split).", ""]
    for row in report.rows:
        if row.kind == "oracle":
            continue
        out += [f"**{row.name}** (agreement {100 * row.agreement:.1f}%)", "", "| oracle \\ chosen | " + " | ".join(names) + " |"]
        out.append("|" + "---|" * (len(names) + 1))
        for name, counts in zip(names, row.assignment, strict=True):
            out.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
        out.append("")
    return "\n".join(out)


def expert_markdown(report: CompareReport) -> str:
    """Model-assignment accuracy and confusion matrices against the data's expert labels (PaSeR Fig. 4)."""
    names = report.model_names
    out = [
        f"Rows: the model that should answer (data meta {report.expert_key!r}); columns: the model chosen "
        f"(units of the {report.split} split, replayed decisions).",
        "",
        "| strategy | assignment accuracy |",
        "|---|---|",
    ]
    out += [f"| {r.name} | {100 * r.expert_accuracy:.1f}% |" for r in report.rows if r.expert_accuracy is not None]
    out.append("")
    for row in report.rows:
        if row.expert_assignment is None:
            continue
        out += [f"**{row.name}**", "", "| expert \\ chosen | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for name, counts in zip(names, row.expert_assignment, strict=True):
            out.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
        out.append("")
    return "\n".join(out)


def expert_figure(report: CompareReport, path: Path, kinds: tuple[str, ...] = ("PaSeR", "IDK", "PaSeR-RandPol")) -> Path:
    """Row-normalised assignment confusion matrices of PaSeR, the IDK cascades and the random policy (Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.expert_assignment is not None and r.name.startswith(kinds)]
    names = report.model_names
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows), 3.4), dpi=120, squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        counts = torch.tensor(row.expert_assignment, dtype=torch.float64)
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        ax.imshow(share.numpy(), vmin=0, vmax=1, cmap="Blues")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{100 * share[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("model chosen", fontsize=8)
        ax.set_title(f"{row.name}\naccuracy {100 * (row.expert_accuracy or 0):.1f}%", fontsize=8)
    axes[0][0].set_ylabel(f"expert ({report.expert_key})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def tvd_markdown(report: CompareReport) -> str:
    """The TVD-threshold sweep (PaSeR Fig. 12) as markdown."""
    names = report.model_names
    head = ["TVD threshold", "TVD reached", "lambda reached", "steps", "mean IoU", "GFLOPs", "IoU/GigaFlop"]
    head += ["assignment accuracy"] if any(p.expert_accuracy is not None for p in report.tvd) else []
    head += [f"% {n}" for n in names]
    lines = [f"Split: {report.split} (replayed). GFLOPs per input, {FLOP_CONVENTION}.", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for p in report.tvd:
        cells = [f"{100 * p.threshold:g}%", f"{100 * p.tvd:.2f}%", f"{p.lam:.3f}", str(p.steps), _fmt(p.mean_iou)]
        cells += [_fmt(p.gflops), f"{p.iou_per_gflop:.2f}"]
        cells += [f"{100 * p.expert_accuracy:.1f}%"] if p.expert_accuracy is not None else []
        cells += [f"{100 * u:.1f}" for u in p.usage]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tvd_figure(report: CompareReport, path: Path) -> Path:
    """IoU/GigaFlop against the TVD threshold (PaSeR Fig. 12)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    xs = [100 * p.threshold for p in report.tvd]
    ax.plot(xs, [p.iou_per_gflop for p in report.tvd], "o-", color="tab:blue")
    for p, x in zip(report.tvd, xs, strict=True):
        ax.annotate(f"IoU {p.mean_iou:.3f}", (x, p.iou_per_gflop), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xlabel("TVD threshold from the lambda = 0 policy (%)")
    ax.set_ylabel("IoU / GigaFlop")
    ax.set_title(f"Fine-tuning stopped at a TVD threshold ({report.split} split)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(report: CompareReport, folder: Path) -> list[Path]:
    """Write ``table1.{md,csv,json}``, ``table2.{md,json}``, ``assignment.{md,json}`` and ``pareto.{csv,png}``."""
    folder = Path(folder)
    written: list[Path] = []

    def text(name: str, content: str) -> None:
        atomic_write_bytes(folder / name, content.encode())
        written.append(folder / name)

    text("table1.md", table1_markdown(report))
    buf = io.StringIO()
    writer = csv.writer(buf)
    largest = largest_gflops(report)
    writer.writerow(
        ["strategy", "kind", "mean_iou", "error", "gflops_per_input", "flops_share_of_largest", "iou_per_gflop"]
        + ["mean_reward", "oracle_gain_share", "agreement"]
        + [f"usage_{n}" for n in report.model_names]
    )
    for row in report.rows:
        r = row.result
        writer.writerow(
            [row.name, row.kind, f"{r.mean_iou:.6f}", f"{1 - r.accuracy:.6f}", f"{r.gflops:.6f}"]
            + [f"{r.gflops / largest:.6f}", f"{r.iou_per_gflop:.6f}", f"{row.mean_reward:.6f}"]
            + [f"{row.oracle_gain_share:.6f}", f"{row.agreement:.6f}"]
            + [f"{u:.4f}" for u in r.usage]
        )
    text("table1.csv", buf.getvalue())
    atomic_write_json(
        folder / "table1.json",
        {
            "split": report.split,
            "flop_convention": FLOP_CONVENTION,
            "rows": [{**asdict(row), "result": row.result.to_dict()} for row in report.rows],
        },
    )
    written.append(folder / "table1.json")
    text("table2.md", table2_markdown(report))
    atomic_write_json(folder / "table2.json", report.table2)
    written.append(folder / "table2.json")
    text("assignment.md", assignment_markdown(report))
    atomic_write_json(
        folder / "assignment.json",
        {"models": report.model_names, "rows": {r.name: r.assignment for r in report.rows if r.kind != "oracle"}},
    )
    written.append(folder / "assignment.json")
    if report.pareto:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(
            ["family", "parameter", "value", "mean_iou", "gflops_per_input", *[f"usage_{n}" for n in report.model_names]]
        )
        for p in report.pareto:
            writer.writerow(
                [p.family, p.parameter, p.value, f"{p.mean_iou:.6f}", f"{p.gflops:.6f}", *[f"{u:.4f}" for u in p.usage]]
            )
        text("pareto.csv", buf.getvalue())
        written.append(pareto_figure(report, folder / "pareto.png"))
    if report.expert_key is not None:
        text("expert_assignment.md", expert_markdown(report))
        atomic_write_json(
            folder / "expert_assignment.json",
            {
                "expert_key": report.expert_key,
                "models": report.model_names,
                "rows": {r.name: {"accuracy": r.expert_accuracy, "counts": r.expert_assignment} for r in report.rows},
            },
        )
        written.append(folder / "expert_assignment.json")
        written.append(expert_figure(report, folder / "expert_assignment.png"))
    if report.tvd:
        text("tvd.md", tvd_markdown(report))
        atomic_write_json(
            folder / "tvd.json",
            {"flop_convention": FLOP_CONVENTION, "points": [{**asdict(p), "iou_per_gflop": p.iou_per_gflop} for p in report.tvd]},
        )
        written.append(folder / "tvd.json")
        written.append(tvd_figure(report, folder / "tvd.png"))
    return written


def pareto_figure(report: CompareReport, path: Path) -> Path:
    """Cost/quality figure: one curve per swept family, single models as points, the oracle as the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    families: dict[str, list[ParetoPoint]] = {}
    for p in report.pareto:
        families.setdefault(p.family, []).append(p)
    styles = {"PaSeR": "o-", "IDK cascade": "s-", "Optimal stopping": "^-", "Oracle": "k--"}
    for family, pts in families.items():
        pts = sorted(pts, key=lambda q: q.gflops)
        xs, ys = [q.gflops for q in pts], [q.mean_iou for q in pts]
        if family in styles:
            ax.plot(xs, ys, styles[family], label=family, markersize=4, linewidth=1.2)
        else:
            ax.plot(xs, ys, "*", markersize=11, label=family)
    ax.set_xscale("log")
    ax.set_xlabel(f"GFLOPs per input (log; {FLOP_CONVENTION})")
    ax.set_ylabel("mean IoU")
    ax.set_title(f"Cost / quality on the {report.split} split (replayed outputs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def print_report(report: CompareReport, console: Console) -> None:
    """Rich tables of Table 1 and Table 2."""
    table = Table(title=f"Table 1 — {report.split} split, GFLOPs per input ({FLOP_CONVENTION})")
    for col in ("strategy", "mean IoU", "GFLOPs", "IoU/GigaFlop", "reward", "oracle gain", "agree"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name in report.model_names:
        table.add_column(f"% {name}", justify="right")
    for row in report.rows:
        r = row.result
        table.add_row(
            row.name,
            _fmt(r.mean_iou),
            _fmt(r.gflops),
            f"{r.iou_per_gflop:.2f}",
            _fmt(row.mean_reward),
            f"{100 * row.oracle_gain_share:.0f}%",
            f"{100 * row.agreement:.0f}%",
            *[f"{100 * u:.1f}" for u in r.usage],
        )
    console.print(table)
    console.print(table2_markdown(report))
    if report.expert_key is not None:
        console.print(expert_markdown(report).split("\n\n**")[0])
    if report.tvd:
        console.print(tvd_markdown(report))


def report_to_json(report: CompareReport) -> str:
    """The whole report as JSON text."""
    return json.dumps(
        {
            "split": report.split,
            "rows": [{**asdict(r), "result": r.result.to_dict()} for r in report.rows],
            "table2": report.table2,
            "pareto": [asdict(p) for p in report.pareto],
            "tvd": [asdict(p) for p in report.tvd],
        },
        indent=2,
    )
