"""What does the router's state cost, and does a cheaper one route as well? State options on a finished run.

The state (f_0's class probabilities and an uncertainty map) is often most of PaSeR's bill: f_0's
MC-dropout passes. For each state option this script rebuilds the replay table of D_RL with that
estimator (`routerkit.training.policy.replay_cache`, i.e. `routerkit.replay.build_unit_table`),
trains a fresh PaSeR policy on it with the run's ``training.policy`` settings over several seeds
(`routerkit.training.recipe.policy_stage`), and evaluates each policy greedily by live routing on
the validation split with the run's zoo (`routerkit.metrics.evaluate_router`), against the
frontier of the single models on the same split (`routerkit.frontier.Frontier`). The run's
models and files are not changed: everything is retrained in memory and nothing is written.

Options (``--options``):
    mc_dropout[:N]      N MC-dropout passes, every pass a full forward (``share_trunk: False``);
                        N defaults to the run's passes. ``mc_dropout`` is the reference.
    shared_trunk[:N]    N MC-dropout passes sharing one trunk forward (only the head runs N times);
                        'n/a' when f_0 has dropout in its trunk (UNet ``dropout_at: both``) or no
                        timm-style ``forward_features`` / ``forward_head`` split (the estimator probes it).
    softmax_entropy     entropy of one deterministic softmax
    max_prob            1 - max_k p_k of one deterministic softmax
    margin              1 - (p_top1 - p_top2) of one deterministic softmax

Default: mc_dropout, shared_trunk, mc_dropout and shared_trunk at N/2 and N/4 passes, and the three
single-pass estimators. Columns: validation mean IoU (mean ± std over seeds; MC-dropout masks at
evaluation are seeded with the policy's seed, so the spread holds both), GFLOPs per input (fvcore,
one multiply-add = one flop; the state, the policy and the routed models), of which the state,
the gain over the single-model frontier at the same GFLOPs (IoU points, mean over seeds), the
state's wall clock on a batch of 32 inputs (median of --repeats) and the share of units per model.

Usage:
    python benchmarks/state_options.py RUN_DIR [--options mc_dropout softmax_entropy ...] [--epochs N] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from routerkit.config import ConfigError
from routerkit.config.build import Experiment
from routerkit.frontier import Frontier, format_gain
from routerkit.metrics import EvalResult, evaluate_router, seeded_rng
from routerkit.pipeline import RoutedPipeline
from routerkit.routers import PaSeRRouter, Router, create_router
from routerkit.training.policy import replay_cache
from routerkit.training.recipe import policy_stage
from routerkit.uncertainty import MCDropoutEntropy, UncertaintyEstimator, create_estimator

MC_OPTIONS = ("mc_dropout", "shared_trunk")
SINGLE_PASS = ("softmax_entropy", "max_prob", "margin")
REFERENCE = "mc_dropout"
#: Noise floor of "routes as well" in IoU (0.3 points), used when the seed spread is smaller.
TOLERANCE = 0.003


@dataclass
class Option:
    """One state option: its estimator, or why it does not apply to this run's f_0."""

    key: str
    passes: str
    estimator: UncertaintyEstimator | None = None
    unavailable: str | None = None


@dataclass
class Row:
    """What one option measured over the seeds (NaN where the option is unavailable)."""

    option: str
    passes: str
    mean_iou: float = math.nan
    std_iou: float = math.nan
    gflops: float = math.nan
    state_gflops: float = math.nan
    hull_gain: float = math.nan
    state_seconds: float = math.nan
    usage: list[float] = field(default_factory=list)
    unavailable: str | None = None
    ious: list[float] = field(default_factory=list)


def run_passes(exp: Experiment) -> int:
    """The run's MC-dropout passes (MCDropoutEntropy's default when the run uses another estimator)."""
    est = exp.pipeline.estimator
    return est.num_passes if isinstance(est, MCDropoutEntropy) else MCDropoutEntropy().num_passes


def default_options(passes: int) -> list[str]:
    fewer = sorted({p for p in (passes // 2, passes // 4) if 1 <= p < passes}, reverse=True)
    return [
        *MC_OPTIONS,
        *[f"{name}:{p}" for name in MC_OPTIONS for p in fewer if not (name == "shared_trunk" and p == 1)],
        *SINGLE_PASS,
    ]


def parse_option(spec: str, passes: int) -> tuple[str, int | None]:
    """``name[:N]`` -> (name, N); N only for the MC options (default: the run's passes).

    Raises:
        ValueError: An unknown name, a pass count that is not a positive integer, or one given to a single-pass option.
    """
    name, sep, count = spec.partition(":")
    if name not in (*MC_OPTIONS, *SINGLE_PASS):
        raise ValueError(f"Expected a state option among {', '.join((*MC_OPTIONS, *SINGLE_PASS))} but got {spec!r}.")
    if name in SINGLE_PASS:
        if sep:
            raise ValueError(f"Expected no pass count for the single-pass option {name!r} but got {spec!r}.")
        return name, None
    if not sep:
        return name, passes
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"Expected {name}:N with N >= 1 passes but got {spec!r}.")
    if name == "shared_trunk" and int(count) == 1:
        raise ValueError("shared_trunk:1 is mc_dropout:1 (one pass has nothing to share); use mc_dropout:1.")
    return name, int(count)


def build_option(spec: str, exp: Experiment, passes: int) -> Option:
    """The estimator of ``spec`` for the run's f_0, or why it does not apply (no dropout; a trunk that cannot be shared)."""
    name, n = parse_option(spec, passes)
    if name in SINGLE_PASS:
        return Option(spec, "1", create_estimator(name))
    assert n is not None
    base_est = exp.pipeline.estimator
    max_batch = base_est.max_batch if isinstance(base_est, MCDropoutEntropy) else None
    est = MCDropoutEntropy(n, max_batch=max_batch, share_trunk=name == "shared_trunk")
    option = Option(spec, f"1 trunk + {n} heads" if name == "shared_trunk" else f"{n} full", est)
    f0, shape = exp.zoo.base, exp.pipeline.input_shape
    probe = exp.data.val.images[:1]
    try:
        est(f0, probe)
    except ValueError as err:  # f_0 has no dropout layer
        return Option(spec, option.passes, unavailable=str(err))
    if name == "shared_trunk" and est.flops(f0, shape) >= MCDropoutEntropy(n, share_trunk=False).flops(f0, shape):
        return Option(
            spec,
            option.passes,
            unavailable="f_0's trunk cannot be shared: it has dropout in forward_features (UNet dropout_at: both) "
            "or no forward_features / forward_head split",
        )
    return option


def fresh_router(exp: Experiment) -> Router:
    """A new PaSeR policy built as the run builds its router (the run's router params when it is PaSeR)."""
    spec = exp.pipeline.router_spec(exp.data.num_classes, exp.router.spatial)
    if isinstance(exp.router, PaSeRRouter):
        return create_router(exp.config.router.name, router_spec=spec, **exp.config.router.params)
    return create_router("paser", router_spec=spec)


def with_estimator(pipeline: RoutedPipeline, estimator: UncertaintyEstimator) -> RoutedPipeline:
    """The run's pipeline (same zoo, partitioner, costs and FLOP accountant) with another state estimator."""
    pipe = copy.copy(pipeline)
    pipe.estimator = estimator
    return pipe


def state_seconds(estimator: UncertaintyEstimator, exp: Experiment, batch: int, repeats: int) -> float:
    """Median wall clock of the state on ``batch`` validation inputs (repeated to fill the batch), after one warm-up."""
    images = exp.data.val.images
    x = images[torch.arange(batch) % images.shape[0]]
    f0 = exp.zoo.base.eval()
    cuda = x.device.type == "cuda"
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        estimator(f0, x)
        if cuda:
            torch.cuda.synchronize(x.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def single_frontier(exp: Experiment) -> tuple[Frontier, list[EvalResult]]:
    """The single models alone on the validation split (live, like `routerkit evaluate`) and their frontier."""
    cfg, grid = exp.config, exp.pipeline.partitioner.grid_shape
    singles = []
    for i, name in enumerate(exp.zoo.names):
        router = create_router("single", num_actions=len(exp.zoo), index=i, grid_shape=grid)
        singles.append(_evaluate(exp, exp.pipeline, router, f"{name} alone", cfg.run.seed))
    return Frontier.of([(r.gflops, r.mean_iou) for r in singles]), singles


def _evaluate(exp: Experiment, pipe: RoutedPipeline, router: Router, name: str, seed: int) -> EvalResult:
    cfg, data = exp.config, exp.data
    return evaluate_router(
        pipe, router, data.val, data.num_classes, name, cfg.evaluation.batch_size, data.ignore_index, cfg.run.device, seed=seed
    )


def measure(option: Option, exp: Experiment, frontier: Frontier, epochs: int, seeds: int, batch: int, repeats: int) -> Row:
    """Replay D_RL with the option's estimator, train ``seeds`` fresh policies on it, evaluate each on validation."""
    row = Row(option.key, option.passes, unavailable=option.unavailable)
    if option.estimator is None:
        return row
    cfg = exp.config
    pipe = with_estimator(exp.pipeline, option.estimator)
    with seeded_rng(cfg.run.seed, cfg.run.device):  # the same MC-dropout draws for every option's D_RL
        table = replay_cache(pipe, exp.accuracy, exp.parts["rl"], cfg.evaluation.batch_size)
    results = []
    for i in range(seeds):
        seed = cfg.run.seed + 2 + i  # the recipe's policy seed for i = 0
        torch.manual_seed(seed)
        router = fresh_router(exp).to(cfg.run.device)
        stage = policy_stage(exp, router, exp.reward, seed, epochs=epochs, cache=table)  # type: ignore[arg-type]
        for epoch in range(epochs):
            stage.train_epoch(epoch)
        results.append(_evaluate(exp, pipe, router.eval(), option.key, seed).against(frontier))
    row.ious = [r.mean_iou for r in results]
    row.mean_iou, row.std_iou = statistics.mean(row.ious), statistics.pstdev(row.ious)
    row.gflops = statistics.mean(r.gflops for r in results)
    row.state_gflops = results[0].state_gflops
    gains = [r.hull_gain for r in results if r.hull_gain is not None and math.isfinite(r.hull_gain)]
    row.hull_gain = statistics.mean(gains) if gains else math.nan
    row.usage = [statistics.mean(u) for u in zip(*(r.usage for r in results), strict=True)]
    row.state_seconds = state_seconds(option.estimator, exp, batch, repeats)
    return row


def cheapest_within_noise(rows: list[Row], tolerance: float) -> tuple[Row | None, Row | None, float]:
    """The reference row (``mc_dropout`` at the run's passes), the cheapest row routing as well, and the tolerance used.

    "As well": validation mean IoU at least the reference's minus ``max(tolerance, reference's seed std)``;
    cheapest: fewest GFLOPs per input, then the fastest state.
    """
    ref = next((r for r in rows if r.option == REFERENCE and r.unavailable is None), None)
    if ref is None:
        return None, None, tolerance
    tol = max(tolerance, ref.std_iou)
    ok = [r for r in rows if r.unavailable is None and r.mean_iou >= ref.mean_iou - tol]
    return ref, min(ok, key=lambda r: (r.gflops, r.state_seconds)), tol


def _f(value: float, digits: int = 4) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def print_table(rows: list[Row], names: list[str], seeds: int, batch: int) -> None:
    over = f"{seeds} seed{'s' * (seeds != 1)}"
    print(
        f"| option | f_0 passes | val mean IoU (mean ± std over {over}) | GFLOPs per input | state GFLOPs "
        f"| vs frontier (IoU points) | state s / batch {batch} | usage {' / '.join(names)} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.unavailable is not None:
            print(f"| {r.option} | {r.passes} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        usage = " / ".join(f"{100 * u:.0f}%" for u in r.usage)
        print(
            f"| {r.option} | {r.passes} | {r.mean_iou:.4f} ± {r.std_iou:.4f} | {_f(r.gflops)} | {_f(r.state_gflops)} "
            f"| {format_gain(r.hull_gain)} | {_f(r.state_seconds)} | {usage} |"
        )
    for r in rows:
        if r.unavailable is not None:
            print(f"\nn/a {r.option}: {r.unavailable}")


def _load(parser: argparse.ArgumentParser, run_dir: str, trust_remote_code: bool) -> Experiment:
    """The finished run, or a clear error (exit 2) when ``run_dir`` is not one."""
    from routerkit.training.run_dir import load_run

    path = Path(run_dir)
    if not path.is_dir():
        parser.error(f"RUN_DIR {path} is not a directory: expected a run directory written by `routerkit train`.")
    if not (path / "config.yaml").exists():
        parser.error(f"RUN_DIR {path} is not a run directory (no config.yaml): expected one written by `routerkit train`.")
    if not (path / "checkpoints" / "final.json").exists():
        parser.error(
            f"RUN_DIR {path} is not a finished run (no checkpoints/final.json): finish it with `routerkit train --resume {path}`."
        )
    try:
        return load_run(path, trust_remote_code=trust_remote_code)
    except (ConfigError, FileNotFoundError) as err:
        parser.error(f"cannot load RUN_DIR {path}: {err}")


def main(argv: list[str] | None = None) -> list[Row]:
    """Measure every state option on a finished run; print the table and the conclusion; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--options", nargs="+", help="state options (default: see above)")
    parser.add_argument("--epochs", type=int, help="policy epochs (default: the run's training.policy.epochs)")
    parser.add_argument("--seeds", type=int, default=3, help="policy seeds per option (default: 3)")
    parser.add_argument("--batch", type=int, default=32, help="inputs per batch of the state's wall clock (default: 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the state, median reported (default: 5)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="IoU noise floor of 'as well' (default: 0.003)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--trust-remote-code", action="store_true", help="import the plugin code of a run not trained here")
    args = parser.parse_args(argv)
    for flag in ("epochs", "seeds", "batch", "repeats", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}.")
    try:
        for spec in args.options or []:
            parse_option(spec, 1)  # names checked before the run is loaded
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = _load(parser, args.run_dir, args.trust_remote_code)
    exp.zoo.eval()
    cfg, passes = exp.config, run_passes(exp)
    epochs = args.epochs or cfg.training.policy.epochs
    try:
        options = [build_option(spec, exp, passes) for spec in args.options or default_options(passes)]
    except ValueError as err:
        parser.error(str(err))
    t0 = time.perf_counter()
    print(f"machine: {platform.machine()} {platform.processor()} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(
        f"run: {args.run_dir} | estimator {cfg.uncertainty.name} {cfg.uncertainty.params} | lambda {cfg.reward.lam} "
        f"| D_RL {len(exp.parts['rl'])} inputs, validation {len(exp.data.val)} | policy epochs {epochs} | seeds {args.seeds}"
    )
    frontier, singles = single_frontier(exp)
    points = ", ".join(f"{r.name} ({r.gflops:.4f}, {r.mean_iou:.4f})" for r in singles)
    print(f"single models on validation (GFLOPs, mean IoU): {points}")
    own = _evaluate(exp, exp.pipeline, exp.router, "run's router", cfg.run.seed).against(frontier)
    print(
        f"the run's own router (all stages, its estimator): mean IoU {own.mean_iou:.4f}, {own.gflops:.4f} GFLOPs "
        f"(state {own.state_gflops:.4f}), vs frontier {format_gain(own.hull_gain)}\n"
    )
    rows = [measure(o, exp, frontier, epochs, args.seeds, args.batch, args.repeats) for o in options]
    print_table(rows, list(exp.zoo.names), args.seeds, args.batch)
    ref, best, tol = cheapest_within_noise(rows, args.tolerance)
    if ref is None:
        print(f"\nno {REFERENCE} row to compare against (not measured, or f_0 has no dropout).")
    else:
        assert best is not None
        print(
            f"\ncheapest option within noise of {REFERENCE} ({ref.passes}; val mean IoU >= {ref.mean_iou:.4f} - {tol:.4f}): "
            f"{best.option} ({best.passes}): {best.gflops:.4f} vs {ref.gflops:.4f} GFLOPs per input "
            f"({100 * (1 - best.gflops / ref.gflops):.0f}% fewer), state {best.state_gflops:.4f} vs {ref.state_gflops:.4f} "
            f"GFLOPs, {best.state_seconds:.4f} vs {ref.state_seconds:.4f} s per batch of {args.batch}, "
            f"val mean IoU {best.mean_iou:.4f} vs {ref.mean_iou:.4f}."
        )
    print(f"({time.perf_counter() - t0:.0f} s; GFLOPs in the fvcore convention: one multiply-add = one flop)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
