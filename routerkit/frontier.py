"""The single-model frontier: what a user gets without a router, and how far a router beats it.

Without a router a user can run one model on every input, or mix two models at the input
level (a share ``q`` of the inputs to ``f_i``, the rest to ``f_j``). The mixes of two models lie
on the segment between their (cost, quality) points, so the best quality reachable for a cost
``c`` is the upper concave envelope of the single models' points, made non-decreasing (spending
more never has to lose quality: the surplus can be left unspent). That envelope is the
**frontier**; every router is judged against it:

- `Frontier.quality_at` (``hull_quality``): the frontier's quality at the router's cost; the router's
  quality minus it is its ``hull_gain`` (positive: routing beats not routing).
- `Frontier.cost_for` (``hull_cost``): the cheapest cost at which the frontier reaches the router's
  quality; ``1 - cost / hull_cost`` is the router's ``hull_saving``.
- Over a sweep (PaSeR over lambda, IDK over thresholds, ...): `aiq` (RouterBench's average
  improvement in quality: the area under the strategy's non-decreasing hull over the cost range
  of the weakest to the best single model, divided by that range) and `apgr` (RouteLLM's average
  performance gap recovered: the same area of ``(q - q_weak) / (q_best - q_weak)``).

Quality is whatever the table reports (mean IoU, accuracy); the mixes interpolate it linearly,
which is exact for accuracy and the stated convention for a split-level IoU. Costs are GFLOPs per
input in the fvcore convention (one multiply-add = one flop).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Frontier", "aiq", "apgr", "format_gain", "format_saving", "sweep_summary", "upper_hull"]

Point = tuple[float, float]


def upper_hull(points: Iterable[Point]) -> list[Point]:
    """The non-decreasing upper concave envelope of ``(cost, quality)`` points, sorted by cost.

    Points that are dominated (another point is cheaper and at least as good) or below a segment
    between two others are dropped; NaN points are ignored.

    Example:
        >>> upper_hull([(0.01, 0.70), (0.15, 0.77), (1.3, 0.77), (0.5, 0.72)])
        [(0.01, 0.7), (0.15, 0.77)]
    """
    pts = sorted({(float(c), float(q)) for c, q in points if math.isfinite(c) and math.isfinite(q)})
    # keep, per cost, the best quality; then only points better than everything cheaper
    best: list[Point] = []
    for c, q in pts:
        if best and c == best[-1][0]:
            best[-1] = (c, max(q, best[-1][1]))
        elif not best or q > best[-1][1]:
            best.append((c, q))
    hull: list[Point] = []
    for p in best:  # Andrew's monotone chain, upper part
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


@dataclass(frozen=True)
class Frontier:
    """The frontier of single models and their two-model mixes.

    Attributes:
        points: Its vertices ``(cost, quality)``, sorted by cost (the efficient single models).
        weak: The cheapest single model's ``(cost, quality)`` (``f_0`` alone, usually).
        best: The best single model's ``(cost, quality)`` (the cheapest among equals).

    Example:
        >>> f = Frontier.of([(0.0086, 0.7101), (0.1466, 0.7724), (1.2986, 0.7714)])
        >>> round(f.quality_at(0.117), 4)
        0.759
    """

    points: tuple[Point, ...]
    weak: Point
    best: Point

    @classmethod
    def of(cls, singles: Sequence[Point]) -> Frontier:
        """The frontier of single models given as ``(cost, quality)`` each."""
        finite = [(float(c), float(q)) for c, q in singles if math.isfinite(c) and math.isfinite(q)]
        if not finite:
            raise ValueError("Expected at least one single model with a finite cost and quality but got none.")
        hull = upper_hull(finite)
        weak = min(finite, key=lambda p: (p[0], -p[1]))
        return cls(tuple(hull), weak, hull[-1])

    def quality_at(self, cost: float) -> float:
        """Best quality reachable for ``cost`` without a router (NaN below the cheapest model's cost)."""
        pts = self.points
        if not math.isfinite(cost) or cost < pts[0][0] - 1e-12 * max(1.0, abs(pts[0][0])):
            return math.nan
        for (c0, q0), (c1, q1) in itertools.pairwise(pts):
            if cost <= c1:
                return q0 + (q1 - q0) * (cost - c0) / (c1 - c0)
        return pts[-1][1]

    def cost_for(self, quality: float) -> float:
        """Cheapest cost at which the frontier reaches ``quality`` (inf above the best model's)."""
        pts = self.points
        if not math.isfinite(quality) or quality > pts[-1][1] + 1e-12:
            return math.inf
        if quality <= pts[0][1]:
            return pts[0][0]
        for (c0, q0), (c1, q1) in itertools.pairwise(pts):
            if quality <= q1:
                return c0 + (c1 - c0) * (quality - q0) / (q1 - q0)
        return pts[-1][0]

    def gain(self, cost: float, quality: float) -> float:
        """``quality - quality_at(cost)``: how far a strategy is above (positive) the frontier."""
        return quality - self.quality_at(cost)

    def saving(self, cost: float, quality: float) -> float:
        """``1 - cost / cost_for(quality)``: the share of the frontier's cost a strategy saves at its quality.

        Negative when the strategy pays more than not routing would; NaN when the frontier cannot
        reach the strategy's quality at all (the strategy beats the best single model).
        """
        need = self.cost_for(quality)
        if not math.isfinite(need) or need <= 0:
            return math.nan
        return 1.0 - cost / need

    def summary(self, cost: float, quality: float) -> dict[str, float]:
        """``hull_quality``, ``hull_gain``, ``hull_cost`` and ``hull_saving`` of one strategy."""
        return {
            "hull_quality": self.quality_at(cost),
            "hull_gain": self.gain(cost, quality),
            "hull_cost": self.cost_for(quality),
            "hull_saving": self.saving(cost, quality),
        }


def _area(curve: list[Point], lo: float, hi: float) -> float:
    """Integral over ``[lo, hi]`` of the piecewise-linear ``curve``, flat beyond its last point."""
    total = 0.0
    ext = [*curve, (max(hi, curve[-1][0]), curve[-1][1])]
    for (c0, q0), (c1, q1) in itertools.pairwise(ext):
        a, b = max(c0, lo), min(c1, hi)
        if b <= a:
            continue
        qa = q0 + (q1 - q0) * (a - c0) / (c1 - c0) if c1 > c0 else q0
        qb = q0 + (q1 - q0) * (b - c0) / (c1 - c0) if c1 > c0 else q1
        total += 0.5 * (qa + qb) * (b - a)
    return total


def _strategy_curve(points: Iterable[Point], frontier: Frontier) -> list[Point]:
    # A strategy can always fall back to the weakest model alone, so its curve starts there.
    return upper_hull([*points, frontier.weak])


def aiq(points: Iterable[Point], frontier: Frontier) -> float:
    """RouterBench's AIQ: mean quality of the strategy's non-decreasing hull over ``[c_weak, c_best]``.

    Args:
        points: The strategy's ``(cost, quality)`` over its sweep.
        frontier: The single-model frontier (its weakest and best models fix the cost range).
    """
    lo, hi = frontier.weak[0], frontier.best[0]
    if hi <= lo:
        return math.nan
    return _area(_strategy_curve(points, frontier), lo, hi) / (hi - lo)


def apgr(points: Iterable[Point], frontier: Frontier) -> float:
    """RouteLLM's APGR: mean over ``[c_weak, c_best]`` of ``(q(c) - q_weak) / (q_best - q_weak)``.

    ``q(c)`` is the strategy's non-decreasing hull. The frontier itself scores the area under its
    own curve; a router above the frontier everywhere scores more.
    """
    gap = frontier.best[1] - frontier.weak[1]
    if gap <= 0:
        return math.nan
    return (aiq(points, frontier) - frontier.weak[1]) / gap


def sweep_summary(families: dict[str, tuple[str, list[Point]]], singles: Sequence[Point]) -> dict[str, object]:
    """APGR and AIQ of every swept family against the frontier of ``singles`` (``compare/frontier.json``).

    Args:
        families: ``{key: (display name, [(cost, quality), ...])}`` of each swept strategy family.
        singles: ``(cost, quality)`` of each single model on the same split.

    Returns:
        The frontier (its vertices, the weakest and best models, the cost range) and, per family
        and for the frontier itself, ``apgr``, ``aiq`` and the best ``hull_gain`` of its points.
    """
    frontier = Frontier.of(singles)
    out: dict[str, object] = {
        "cost_range": [frontier.weak[0], frontier.best[0]],
        "frontier": {
            "points": [list(p) for p in frontier.points],
            "weak": list(frontier.weak),
            "best": list(frontier.best),
            "apgr": apgr(frontier.points, frontier),
            "aiq": aiq(frontier.points, frontier),
        },
    }
    rows = {}
    for key, (name, pts) in families.items():
        gains = [frontier.gain(c, q) for c, q in pts]
        finite = [g for g in gains if math.isfinite(g)]
        rows[key] = {
            "family": name,
            "apgr": apgr(pts, frontier),
            "aiq": aiq(pts, frontier),
            "max_hull_gain": max(finite) if finite else math.nan,
            "points": [[c, q, g] for (c, q), g in zip(pts, gains, strict=True)],
        }
    out["families"] = rows
    return out


def format_gain(gain: float | None) -> str:
    """A ``hull_gain`` in IoU points, signed (``+1.23``); blank when not compared, ``n/a`` below the cheapest model."""
    if gain is None:
        return ""
    return "n/a" if math.isnan(gain) else f"{100 * gain:+.2f}"


def format_saving(saving: float | None) -> str:
    """A ``hull_saving`` as a percentage; blank when not compared, ``beyond`` past the best single model."""
    if saving is None:
        return ""
    return "beyond" if math.isnan(saving) else f"{100 * saving:.0f}%"
