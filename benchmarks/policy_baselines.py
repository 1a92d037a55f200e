"""Does a REINFORCE baseline help? Policy training on replayed outputs of a trained run.

For each baseline ('none', 'mean', 'expected') and each credit assignment ('unit', 'input'),
trains a fresh PaSeR policy on D_RL of a finished run (task models frozen, outputs replayed)
with several seeds, then reports the greedy policy's mean per-unit reward on the validation
split (mean and spread over seeds: a lower-variance gradient gives a higher, steadier result).

Usage:
    python benchmarks/policy_baselines.py RUN_DIR [--epochs 60] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from routerkit.training.policy import PolicyTraining, replay_cache
from routerkit.training.runner import load_run
from routerkit.training.schedules import StageSettings
from routerkit.uncertainty import BaseOutput


def greedy_reward(exp, router, cache) -> float:  # type: ignore[no-untyped-def]
    probs, unc, acc = cache
    with torch.no_grad():
        actions = router.logits(BaseOutput(probs, unc)).argmax(-1)
    costs = exp.pipeline.costs
    table = exp.reward(acc, acc[..., :1].expand_as(acc), costs.expand_as(acc))
    return float(table.gather(-1, actions.unsqueeze(-1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    exp = load_run(args.run_dir)
    cfg = exp.config.training.policy
    print(f"machine: {platform.machine()} {platform.processor()} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    lam = getattr(exp.reward, "lam", "?")
    print(f"run: {args.run_dir} | lambda {lam} | epochs {args.epochs} | seeds {args.seeds}\n")
    train_cache = replay_cache(exp.pipeline, exp.accuracy, exp.parts["rl"])
    val_cache = replay_cache(exp.pipeline, exp.accuracy, exp.data.val)
    print("| baseline | credit | val reward (mean ± std over seeds) | seconds |")
    print("|---|---|---|---|")
    for credit in ("unit", "input"):
        for baseline in ("none", "mean", "expected"):
            rewards, t0 = [], time.perf_counter()
            for seed in range(args.seeds):
                router = copy.deepcopy(exp.router)
                torch.manual_seed(seed)
                for m in router.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
                settings = StageSettings(args.epochs, cfg.lr, cfg.batch_size)
                stage = PolicyTraining(
                    exp.pipeline,
                    router,
                    exp.reward,
                    exp.accuracy,
                    exp.parts["rl"],
                    settings,
                    seed,
                    alpha_start=cfg.alpha_start,
                    alpha_end=cfg.alpha_end,
                    baseline=baseline,
                    credit=credit,
                )
                stage._cache = train_cache
                for epoch in range(args.epochs):
                    stage.run_epoch(epoch)
                rewards.append(greedy_reward(exp, router, val_cache))
            mean = statistics.mean(rewards)
            std = statistics.pstdev(rewards)
            print(f"| {baseline} | {credit} | {mean:.4f} ± {std:.4f} | {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
