"""Routed inference speed: batched executor vs its parts, vs a per-patch loop, vs the largest model.

Builds the battery example's zoo (random weights: timing does not depend on them), fixes a
routing decision per patch with a given model mix, and times, best of ``--repeats``:

- the routed pipeline end to end (MC-dropout passes of f_0, policy network, grouped execution,
  stitching) with fixed decisions;
- the sum of its parts run on their own: f_0's batched MC passes, the policy on the state and
  each chosen model once on its stacked units (the overhead target is at most 15%);
- a per-patch Python loop like the reference implementation: each patch through its model
  alone, batch 1 (target: the pipeline at least 10x faster at batch 32);
- the largest model on every patch, to report the realised wall-clock speed-up next to the
  GFLOP ratio (fvcore convention: one multiply-add = one flop).

Usage:
    python benchmarks/routed_inference.py [--batch 32] [--mix 0.4 0.45 0.15] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from routerkit import PatchGrid, RoutedPipeline, Zoo
from routerkit.flops import FLOP_CONVENTION
from routerkit.models import UNet
from routerkit.routers import PaSeRRouter, Router
from routerkit.uncertainty import BaseOutput


class FixedRouter(Router):
    """Replays given decisions but charges (and runs) a PaSeR policy network, like a real router."""

    def __init__(self, actions: torch.Tensor, policy: PaSeRRouter) -> None:
        super().__init__(policy.num_actions, policy.grid_shape, policy.in_channels)
        self.actions, self.paser = actions, policy

    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
        self.paser.logits(state)  # the policy's cost is real
        return self.actions[: state.probs.shape[0]]

    def flops_module(self) -> torch.nn.Module:
        return self.paser.policy

    def policy_input(self, state: BaseOutput) -> torch.Tensor:
        return self.paser.policy_input(state)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mix", type=float, nargs=3, default=[0.4, 0.45, 0.15], help="share of patches per model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes of f_0")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w, grid = 112, 128, (4, 4)
    zoo = Zoo({"f0_small": UNet(1, 3, 2, 3, dropout=0.1), "f1_medium": UNet(1, 3, 8, 3), "f2_large": UNet(1, 3, 24, 3)}).eval()
    pipe = RoutedPipeline(zoo, PatchGrid(*grid), "mc_dropout", "flops", (1, h, w))
    pipe.estimator.num_passes = args.passes  # type: ignore[attr-defined]
    policy = PaSeRRouter(3, grid, in_channels=4).eval()
    x = torch.rand(args.batch, 1, h, w)
    mix = torch.tensor(args.mix) / sum(args.mix)
    actions = torch.multinomial(mix, args.batch * 16, replacement=True, generator=torch.Generator().manual_seed(0))
    actions = actions.reshape(args.batch, 16)
    router = FixedRouter(actions, policy).eval()
    part = pipe.partitioner
    units = part.split(x)
    flat = actions.reshape(-1)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} "
        f"| threads {torch.get_num_threads()}"
    )
    print(f"zoo: {zoo.num_parameters()} params | input 1x{h}x{w}, {grid[0]}x{grid[1]} patches | batch {args.batch}")
    print(f"mix (f0/f1/f2): {[round(float(v), 3) for v in torch.bincount(flat, minlength=3) / flat.numel()]}\n")

    with torch.no_grad():
        t_pipe = best_of(lambda: pipe.route(x, router), args.repeats)

        def parts() -> None:
            base = pipe.estimator(zoo.base, x)
            policy.logits(base)
            for i in (1, 2):
                idx = torch.nonzero(flat == i, as_tuple=True)[0]
                if idx.numel():
                    zoo[i](units[idx])

        t_parts = best_of(parts, args.repeats)
        t_base = best_of(lambda: pipe.estimator(zoo.base, x), args.repeats)
        state = pipe.estimator(zoo.base, x)
        t_policy = best_of(lambda: policy.logits(state), args.repeats)

        def per_patch_loop() -> None:
            base = pipe.estimator(zoo.base, x)
            policy.logits(base)
            out = torch.empty(args.batch, 3, h, w)
            ph, pw = h // grid[0], w // grid[1]
            for b in range(args.batch):
                for p in range(16):
                    r, c = divmod(p, grid[1])
                    a = int(actions[b, p])
                    sl = (slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
                    if a == 0:
                        out[b, :, sl[0], sl[1]] = base.probs[b, :, sl[0], sl[1]]
                    else:
                        patch = x[b : b + 1, :, sl[0], sl[1]]
                        out[b, :, sl[0], sl[1]] = torch.softmax(zoo[a](patch), 1)[0]

        t_loop = best_of(per_patch_loop, max(1, args.repeats // 2))
        t_large = best_of(lambda: zoo[2](units), args.repeats)

    routed_flops = float(pipe.route(x, router).flops.mean())
    large_flops = pipe.accountant.unit_flops[2] * 16
    print("| measurement | seconds per batch | ratio |")
    print("|---|---|---|")
    print(f"| routed pipeline (fixed decisions) | {t_pipe:.4f} | 1.00 |")
    print(
        f"| sum of parts (f_0 MC passes + policy + each model on its stacked units) | {t_parts:.4f} | "
        f"overhead {100 * (t_pipe / t_parts - 1):+.1f}% |"
    )
    print(f"| of which f_0's {args.passes} MC-dropout passes (one batched forward) | {t_base:.4f} | {t_base / t_pipe:.2f} |")
    print(f"| of which the policy network | {t_policy:.4f} | {t_policy / t_pipe:.2f} |")
    print(f"| per-patch Python loop (batch 1 per patch) | {t_loop:.4f} | pipeline {t_loop / t_pipe:.1f}x faster |")
    print(f"| largest model on every patch | {t_large:.4f} | wall-clock speed-up {t_large / t_pipe:.2f}x |")
    print(
        f"\nGFLOPs per input: routed {routed_flops / 1e9:.4f}, largest model {large_flops / 1e9:.4f}, "
        f"GFLOP ratio {large_flops / routed_flops:.2f}x ({FLOP_CONVENTION})."
    )


if __name__ == "__main__":
    main()
