"""Routed inference speed on the battery example: each inference lever, the routing overhead, the largest model.

Builds the zoo, the partitioner, the uncertainty estimator and the router from the example's
config (``--config``, default ``examples/battery.yaml``: its ``zoo.models``, ``uncertainty`` and
``router`` sections, through routerkit's config loading and registries, on a few generated
inputs; random weights: timing does not depend on them), fixes one routing decision per patch
with a given model mix, and times on the same batch, best of ``--repeats``:

1. **Levers**, one row each, cumulative: the pipeline under ``torch.no_grad`` with ``N`` full
   MC-dropout passes of f_0; + ``torch.inference_mode``; + batch norm folded into the
   convolutions; + channels-last weights; + the shared trunk (f_0 rebuilt with
   ``dropout_at: head``: its trunk once, the 1 x 1 head N times); + ``torch.compile`` (opt-in,
   ``--compile``: the first compile of each shape takes minutes on a small CPU). Every row is
   timed against the largest model on every patch **with the same levers** (for fairness), and
   shows the wall-clock speed-up next to the GFLOP ratio (fvcore convention: one multiply-add
   = one flop; the FLOPs counted are those of what ran, folded models included) and their ratio
   (target at least 0.7 at batch 32).
2. **The routing machinery**, with every lever but compile: the pipeline vs the sum of its
   parts run on their own (overhead target at most 15%), vs a per-patch Python loop like the
   reference implementation (batch 1 per patch), vs the largest model on every patch.

Usage:
    python benchmarks/routed_inference.py [--batch 32] [--mix 0.4 0.45 0.15] [--repeats 3] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from routerkit import RoutedPipeline, Zoo, create_estimator
from routerkit.config import load_config
from routerkit.config.build import add_plugin_path, build_experiment, build_zoo
from routerkit.flops import FLOP_CONVENTION
from routerkit.inference import check_compile, prepare_for_inference
from routerkit.routers import Router
from routerkit.uncertainty import BaseOutput, MCDropoutEntropy

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "battery.yaml"
#: Overrides that shrink the example's data to a few inputs (only the shapes and classes are used).
SMALL_DATA = {"num_train": 6, "num_val": 1, "num_test": 1}


class FixedRouter(Router):
    """Replays given decisions but runs (and is charged for) a real router's network on the state."""

    def __init__(self, actions: Tensor, router: Router) -> None:
        super().__init__(router.num_actions, router.grid_shape, router.in_channels, router.spatial)
        self.actions, self.inner = actions, router

    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> Tensor:
        self.inner.route(state, greedy=True)  # the router's cost is real
        return self.actions[: state.probs.shape[0]]

    def flops_module(self) -> torch.nn.Module | None:
        return self.inner.flops_module()

    def policy_input(self, state: BaseOutput) -> Tensor:
        return self.inner.policy_input(state)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class Lever:
    """One row of the levers table: a pipeline and router, and the grad mode the caller routes in."""

    name: str
    pipe: RoutedPipeline
    router: Router
    grad: Callable[[], contextlib.AbstractContextManager[Any]]
    large_from: str | None = None  # reuse the largest model's time of that row (same model, same levers)


def time_lever(
    lever: Lever, x: Tensor, units: Tensor, actions: Tensor, large: int, large_times: dict[str, float], repeats: int
) -> tuple[float, float, float, float]:
    """Seconds per batch of the routed pipeline, of f_0's state and of the largest model on every unit; routed FLOPs."""
    pipe, fixed = lever.pipe, FixedRouter(actions, lever.router).eval()
    with lever.grad():
        t_route = best_of(lambda: pipe.route(x, fixed), repeats)
        t_state = best_of(lambda: pipe.estimator(pipe.zoo.base, x), repeats)
        if lever.large_from is None:
            large_times[lever.name] = best_of(lambda: pipe.zoo[large](units), repeats)
        routed = float(pipe.route(x, fixed).flops.mean())
    return t_route, t_state, large_times[lever.large_from or lever.name], routed


def load_example(path: Path, extra: list[str]) -> Any:
    """The example's config with its data shrunk to a few inputs (``SMALL_DATA`` keys it has)."""
    add_plugin_path(path.parent)
    cfg = load_config(path, extra)
    shrink = [f"data.params.{key}={value}" for key, value in SMALL_DATA.items() if key in cfg.data.params]
    return load_config(path, [*shrink, *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="experiment YAML whose zoo is timed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--mix",
        type=float,
        nargs="+",
        default=None,
        help="share of patches per model (default: 0.4 0.45 0.15 for 3 models, else equal)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (compiles for minutes on a small CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_example(args.config, [])
    exp = build_experiment(cfg)
    zoo, part, shape = exp.zoo.eval(), exp.pipeline.partitioner, exp.pipeline.input_shape
    estimator, cost = exp.pipeline.estimator, exp.pipeline.cost_model
    router = exp.router.eval()
    if router.is_cascade or router.needs_targets:
        raise SystemExit(f"{args.config}: expected a pick-first router but got {type(router).__name__}.")
    mc = isinstance(estimator, MCDropoutEntropy)
    full = create_estimator(cfg.uncertainty.name, **{**cfg.uncertainty.params, "share_trunk": False}) if mc else estimator
    passes = estimator.num_passes
    num_models, units_per_input = len(zoo), part.num_units

    mix = args.mix or ([0.4, 0.45, 0.15] if num_models == 3 else [1.0] * num_models)
    if len(mix) != num_models:
        raise SystemExit(f"Expected --mix with one share per model ({num_models}) but got {len(mix)}.")
    torch.manual_seed(0)
    x = torch.rand(args.batch, *shape)
    probs = torch.tensor(mix) / sum(mix)
    gen = torch.Generator().manual_seed(0)
    actions = torch.multinomial(probs, args.batch * units_per_input, replacement=True, generator=gen)
    actions = actions.reshape(args.batch, units_per_input)
    flat = actions.reshape(-1)

    base_pipe = RoutedPipeline(zoo, part, full, cost, shape)
    large = max(range(num_models), key=lambda i: base_pipe.accountant.unit_flops[i])
    f0 = cfg.zoo.models[0]
    levers = [
        Lever(
            f"baseline: torch.no_grad, {passes} full MC passes" if mc else "baseline: torch.no_grad",
            base_pipe,
            router,
            torch.no_grad,
        ),
        Lever(
            "+ torch.inference_mode",
            base_pipe.for_inference(fold_bn=False),
            prepare_for_inference(router, fold_bn=False),
            torch.inference_mode,
        ),
        Lever(
            "+ batch norm folded into convolutions",
            base_pipe.for_inference(),
            prepare_for_inference(router),
            torch.inference_mode,
        ),
    ]
    fast_router = prepare_for_inference(router, channels_last=True)
    levers.append(Lever("+ channels-last", base_pipe.for_inference(channels_last=True), fast_router, torch.inference_mode))
    trunk_note = "not run: the estimator is not MC dropout"
    trunk_pipe: RoutedPipeline | None = None
    if mc:
        try:
            head_cfg = load_example(args.config, ["zoo.models.0.params.dropout_at=head"])
            head_zoo = build_zoo(head_cfg, in_channels=shape[0], num_classes=exp.data.num_classes).eval()
            trunk_zoo = Zoo({name: head_zoo[0] if i == 0 else m for i, (name, m) in enumerate(zip(zoo.names, zoo, strict=True))})
            shared = create_estimator(cfg.uncertainty.name, **{**cfg.uncertainty.params, "share_trunk": True})
            trunk_pipe = RoutedPipeline(trunk_zoo, part, shared, cost, shape)
        except Exception as err:  # a zoo whose f_0 has no dropout_at: the row says why
            trunk_note = f"not run: f_0 ({f0.model}) cannot be built with dropout_at: head ({err})"
    if trunk_pipe is not None:
        name = f"+ shared trunk (f_0 dropout_at: head; trunk once, {passes} heads)"
        levers.append(
            Lever(name, trunk_pipe.for_inference(channels_last=True), fast_router, torch.inference_mode, "+ channels-last")
        )
    compile_note = "not run (pass --compile; the first compile of each shape takes minutes on a small CPU)"
    if args.compile:
        try:
            check_compile()
            last = trunk_pipe or base_pipe
            levers.append(
                Lever("+ torch.compile", last.for_inference(channels_last=True, compile=True), fast_router, torch.inference_mode)
            )
        except RuntimeError as err:
            compile_note = f"not available: {err}"

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} "
        f"| threads {torch.get_num_threads()}"
    )
    params = " / ".join(f"{n} {p:,}" for n, p in zip(zoo.names, zoo.num_parameters(), strict=True))
    print(f"config: {args.config.name} | zoo {params} params | input {'x'.join(map(str, shape))}, {part!r} | batch {args.batch}")
    f0_at = f0.params.get("dropout_at", "both")
    print(
        f"state: {cfg.uncertainty.name} {cfg.uncertainty.params} | f_0 in the config: dropout_at {f0_at} | "
        f"router: {cfg.router.name} {cfg.router.params}"
    )
    shares = torch.bincount(flat, minlength=num_models) / flat.numel()
    print(f"mix ({'/'.join(f'f{i}' for i in range(num_models))}): {[round(float(v), 3) for v in shares]}\n")

    units = part.split_inputs(x)  # what a unit's model runs on (with the partitioner's halo, if any)
    print(
        "| lever (cumulative) | s / batch | of which f_0's state | largest model on every patch, s | wall-clock speed-up "
        "| routed GFLOPs / input | GFLOP ratio | speed-up / GFLOP ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    large_times: dict[str, float] = {}
    results: list[tuple[str, float]] = []
    for lever in levers:
        t_route, t_state, t_large, routed = time_lever(lever, x, units, actions, large, large_times, args.repeats)
        large_flops = lever.pipe.accountant.unit_flops[large] * units_per_input
        speed_up, ratio = t_large / t_route, large_flops / routed
        results.append((lever.name, speed_up / ratio))
        print(
            f"| {lever.name} | {t_route:.4f} | {t_state:.4f} | {t_large:.4f} | {speed_up:.2f}x | {routed / 1e9:.4f} | "
            f"{ratio:.2f}x | {speed_up / ratio:.2f} |"
        )
    if trunk_pipe is None:
        print(f"| + shared trunk | {trunk_note} | | | | | | |")
    if not any(lev.name == "+ torch.compile" for lev in levers):
        print(f"| + torch.compile | {compile_note} | | | | | | |")
    best_name, best = max(results, key=lambda r: r[1])
    print(f"\nTarget speed-up / GFLOP ratio >= 0.7: best {best:.2f} ({best_name}): {'met' if best >= 0.7 else 'not met'}.")

    # The routing machinery with every lever but compile.
    lever = next(lev for lev in reversed(levers) if lev.name != "+ torch.compile")
    pipe, fixed, policy = lever.pipe, FixedRouter(actions, lever.router).eval(), lever.router
    with torch.inference_mode():
        t_pipe = best_of(lambda: pipe.route(x, fixed), args.repeats)

        def parts() -> None:
            base = pipe.estimator(pipe.zoo.base, x)
            policy.route(base)
            for i in range(1, num_models):
                idx = torch.nonzero(flat == i, as_tuple=True)[0]
                if idx.numel():
                    pipe.zoo[i](units[idx])

        t_parts = best_of(parts, args.repeats)
        t_base = best_of(lambda: pipe.estimator(pipe.zoo.base, x), args.repeats)
        state = pipe.estimator(pipe.zoo.base, x)
        t_policy = best_of(lambda: policy.route(state), args.repeats)
        t_models = {}
        for i in range(1, num_models):
            chosen = units[torch.nonzero(flat == i, as_tuple=True)[0]]
            if chosen.shape[0]:
                t_models[i] = (chosen.shape[0], best_of(lambda m=pipe.zoo[i], u=chosen: m(u), args.repeats))

        def per_patch_loop() -> None:
            base = pipe.estimator(pipe.zoo.base, x)
            policy.route(base)
            base_units = part.split(base.probs)
            out = torch.empty_like(base_units)
            for u in range(flat.numel()):
                a = int(flat[u])
                out[u] = base_units[u] if a == 0 else torch.softmax(part.crop(pipe.zoo[a](units[u : u + 1])), 1)[0]
            part.stitch(out, args.batch)

        t_loop = best_of(per_patch_loop, max(1, args.repeats // 2))
        t_large = best_of(lambda: pipe.zoo[large](units), args.repeats)
        routed_flops = float(pipe.route(x, fixed).flops.mean())
    large_flops = pipe.accountant.unit_flops[large] * units_per_input

    print(f"\nThe routing machinery, with the levers up to '{lever.name}' (no compile):\n")
    print("| measurement | seconds per batch | ratio |")
    print("|---|---|---|")
    print(f"| routed pipeline (fixed decisions) | {t_pipe:.4f} | 1.00 |")
    print(
        f"| sum of parts (f_0's state + policy + each model on its stacked units) | {t_parts:.4f} | "
        f"overhead {100 * (t_pipe / t_parts - 1):+.1f}% |"
    )
    print(f"| of which f_0's state ({passes} MC passes, one batched forward) | {t_base:.4f} | {t_base / t_pipe:.2f} |")
    print(f"| of which the policy network | {t_policy:.4f} | {t_policy / t_pipe:.2f} |")
    for i, (count, seconds) in t_models.items():
        print(f"| of which {zoo.names[i]} on its {count} units | {seconds:.4f} | {seconds / t_pipe:.2f} |")
    print(f"| per-patch Python loop (batch 1 per patch) | {t_loop:.4f} | pipeline {t_loop / t_pipe:.1f}x faster |")
    print(f"| largest model on every patch | {t_large:.4f} | wall-clock speed-up {t_large / t_pipe:.2f}x |")
    print(
        f"\nGFLOPs per input: routed {routed_flops / 1e9:.4f}, largest model {large_flops / 1e9:.4f}, "
        f"GFLOP ratio {large_flops / routed_flops:.2f}x ({FLOP_CONVENTION})."
    )


if __name__ == "__main__":
    main()
