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

One module per job: `routerkit.compare.harness` (the strategies and their rows),
`routerkit.compare.sweeps` (policies retrained on replayed tables: the Pareto and TVD sweeps),
`routerkit.compare.report` (markdown, CSV, JSON, the console), `routerkit.compare.figures`
(the PNGs) and `routerkit.compare.results` (the dataclasses). Rows are found by their stable
`StrategyRow.key` (``report.row("paser")``), not by display name.
"""

from __future__ import annotations

from routerkit.compare.figures import expert_figure, pareto_figure, tvd_figure
from routerkit.compare.harness import Strategy, compare_strategies, expert_units
from routerkit.compare.report import (
    assignment_markdown,
    expert_markdown,
    largest_gflops,
    print_report,
    report_to_json,
    table1_markdown,
    table2_markdown,
    tvd_markdown,
    write_report,
)
from routerkit.compare.results import CompareReport, ParetoPoint, StrategyRow, TVDPoint, single_key
from routerkit.compare.sweeps import pareto_sweep, stage_policy, train_paser_on_table, tvd_sweep

__all__ = [
    "CompareReport",
    "ParetoPoint",
    "Strategy",
    "StrategyRow",
    "TVDPoint",
    "assignment_markdown",
    "compare_strategies",
    "expert_figure",
    "expert_markdown",
    "expert_units",
    "largest_gflops",
    "pareto_figure",
    "pareto_sweep",
    "print_report",
    "report_to_json",
    "single_key",
    "stage_policy",
    "table1_markdown",
    "table2_markdown",
    "train_paser_on_table",
    "tvd_figure",
    "tvd_markdown",
    "tvd_sweep",
    "write_report",
]
