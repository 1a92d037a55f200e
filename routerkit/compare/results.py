"""What `compare_strategies` computes: the strategy rows, the sweep points and the report holding them.

Rows are found by a stable `StrategyRow.key` (``"paser"``, ``"idk_grid"``, ``"idk_iou_match"``,
``"optimal_stopping"``, ``"optimal_stopping_joint"``, ``"random"``, ``"single:<model name>"``,
``"oracle"``), never by their display name, which is free text for the tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from routerkit.metrics import EvalResult

PASER = "paser"
IDK_GRID = "idk_grid"
IDK_IOU_MATCH = "idk_iou_match"
OPTIMAL_STOPPING = "optimal_stopping"
#: The optimal-stopping cascade trained jointly with f_1..f_m, on a copy of the zoo (its own classifiers).
OPTIMAL_STOPPING_JOINT = "optimal_stopping_joint"
RANDOM = "random"
ORACLE = "oracle"
IDK = "idk"  # the swept IDK family of the Pareto figure (thresholds at offsets)


def single_key(model_name: str) -> str:
    """The key of the row (or Pareto family) of zoo model ``model_name`` alone: ``"single:<name>"``."""
    return f"single:{model_name}"


@dataclass
class StrategyRow:
    """One strategy of Table 1.

    Attributes:
        key: Stable key (``"paser"``, ``"single:f2_large"``, ...; see the module docstring).
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

    key: str
    name: str
    kind: str
    result: EvalResult
    mean_reward: float
    oracle_gain_share: float
    assignment: list[list[int]]
    agreement: float
    expert_assignment: list[list[int]] | None = None
    expert_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to ``table1.json`` (the key is not written: files show display names)."""
        out = asdict(self)
        del out["key"]
        return {**out, "result": self.result.to_dict()}


@dataclass
class ParetoPoint:
    """One point of the cost/quality sweep (replayed split).

    Attributes:
        key: Stable key of the family (``"paser"``, ``"idk"``, ``"optimal_stopping"``, ``"single:<name>"``, ``"oracle"``).
        family: Display name of the family.
        parameter: What was swept (``"lambda"``, ``"alpha"``, ...).
        value: Its value at this point.
        mean_iou: Mean IoU on the replayed split.
        gflops: GFLOPs per input.
        usage: Share of units sent to each model.
    """

    key: str
    family: str
    parameter: str
    value: float
    mean_iou: float
    gflops: float
    usage: list[float]

    def to_dict(self) -> dict[str, Any]:
        """The point as written to JSON (without its key)."""
        out = asdict(self)
        del out["key"]
        return out


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
    #: The sweep against the single-model frontier (`routerkit.frontier.sweep_summary`): APGR, AIQ per family.
    frontier: dict[str, Any] = field(default_factory=dict)

    def row(self, key: str) -> StrategyRow:
        """The row with stable key ``key`` (``"paser"``, ``"single:f2_large"``, ...).

        Raises:
            KeyError: No row has that key; the message lists the keys there are.
        """
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"Expected a strategy key among {[r.key for r in self.rows]} but got {key!r}.")
