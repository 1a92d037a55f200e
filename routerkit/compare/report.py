"""The comparison as text: Table 1, Table 2, the assignment matrices and the sweeps in markdown, CSV and JSON.

`write_report` writes every file of ``compare/`` (atomically, figures from `routerkit.compare.figures`);
`print_report` prints Table 1 and Table 2 to a rich console.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from routerkit._io import atomic_write_bytes, atomic_write_json
from routerkit.compare.figures import expert_figure, pareto_figure, tvd_figure
from routerkit.compare.results import CompareReport, single_key
from routerkit.flops import FLOP_CONVENTION
from routerkit.frontier import format_gain, format_saving


def _fmt(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}f}"


def largest_gflops(report: CompareReport) -> float:
    """GFLOPs per input of the largest model alone (the reference of Guan et al.'s "FLOPs %")."""
    for row in report.rows:
        if row.key == single_key(report.model_names[-1]):
            return row.result.gflops
    return float("nan")


def table1_markdown(report: CompareReport) -> str:
    """The paper's Table 1 as markdown, with Guan et al.'s error and FLOPs as a percentage of the largest model."""
    names = report.model_names
    head = ["strategy", "mean IoU", "error", "GFLOPs", "FLOPs % of largest", "IoU/GigaFlop", "vs frontier", "saving"]
    head += ["mean reward", "oracle gain share", *[f"% {n}" for n in names]]
    largest = largest_gflops(report)
    lines = [
        f"Split: {report.split}. GFLOPs per input count every pass that ran ({FLOP_CONVENTION}); "
        f"error = 1 - accuracy (per pixel for segmentation); FLOPs % relative to {names[-1]} alone. "
        "vs frontier: mean IoU minus the best the single models and their input-level mixes reach at the same "
        "GFLOPs (IoU points); saving: share of the GFLOPs that frontier needs for the same mean IoU.",
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
            format_gain(r.hull_gain),
            format_saving(r.hull_saving),
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
        + ["hull_quality", "hull_gain", "hull_saving", "mean_reward", "oracle_gain_share", "agreement"]
        + [f"usage_{n}" for n in report.model_names]
    )
    for row in report.rows:
        r = row.result
        writer.writerow(
            [row.name, row.kind, f"{r.mean_iou:.6f}", f"{1 - r.accuracy:.6f}", f"{r.gflops:.6f}"]
            + [f"{r.gflops / largest:.6f}", f"{r.iou_per_gflop:.6f}"]
            + ["" if v is None else f"{v:.6f}" for v in (r.hull_quality, r.hull_gain, r.hull_saving)]
            + [f"{row.mean_reward:.6f}"]
            + [f"{row.oracle_gain_share:.6f}", f"{row.agreement:.6f}"]
            + [f"{u:.4f}" for u in r.usage]
        )
    text("table1.csv", buf.getvalue())
    atomic_write_json(
        folder / "table1.json",
        {
            "split": report.split,
            "flop_convention": FLOP_CONVENTION,
            "rows": [row.to_dict() for row in report.rows],
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
    if report.frontier:
        atomic_write_json(folder / "frontier.json", {"flop_convention": FLOP_CONVENTION, **report.frontier})
        written.append(folder / "frontier.json")
        text("frontier.md", frontier_markdown(report))
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


def frontier_markdown(report: CompareReport) -> str:
    """Each swept family against the single-model frontier: APGR (RouteLLM) and AIQ (RouterBench)."""
    f = report.frontier
    lo, hi = f["cost_range"]
    lines = [
        f"Cost range {lo:.4f} .. {hi:.4f} GFLOPs per input: from the cheapest single model to the cheapest best one "
        f"({FLOP_CONVENTION}). APGR: mean share of the quality gap between them recovered; AIQ: mean quality of the "
        "family's non-decreasing hull over that range. The frontier (single models and their input-level mixes) "
        "scores the first row; a router worth having scores above it.",
        "",
        "| family | APGR | AIQ (mean IoU) | best point vs frontier (IoU points) |",
        "|---|---|---|---|",
        f"| frontier (no router) | {f['frontier']['apgr']:.3f} | {f['frontier']['aiq']:.4f} | +0.00 |",
    ]
    for row in f["families"].values():
        lines.append(f"| {row['family']} | {row['apgr']:.3f} | {row['aiq']:.4f} | {format_gain(row['max_hull_gain'])} |")
    return "\n".join(lines) + "\n"


def print_report(report: CompareReport, console: Console) -> None:
    """Rich tables of Table 1 and Table 2."""
    table = Table(title=f"Table 1 — {report.split} split, GFLOPs per input ({FLOP_CONVENTION})")
    for col in ("strategy", "mean IoU", "GFLOPs", "IoU/GigaFlop", "vs frontier", "saving", "reward", "oracle gain", "agree"):
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
            format_gain(r.hull_gain),
            format_saving(r.hull_saving),
            _fmt(row.mean_reward),
            f"{100 * row.oracle_gain_share:.0f}%",
            f"{100 * row.agreement:.0f}%",
            *[f"{100 * u:.1f}" for u in r.usage],
        )
    console.print(table)
    console.print(table2_markdown(report))
    if report.frontier:
        console.print(frontier_markdown(report))
    if report.expert_key is not None:
        console.print(expert_markdown(report).split("\n\n**")[0])
    if report.tvd:
        console.print(tvd_markdown(report))


def report_to_json(report: CompareReport) -> str:
    """The whole report as JSON text."""
    return json.dumps(
        {
            "split": report.split,
            "rows": [r.to_dict() for r in report.rows],
            "table2": report.table2,
            "pareto": [p.to_dict() for p in report.pareto],
            "frontier": report.frontier,
            "tvd": [asdict(p) for p in report.tvd],
        },
        indent=2,
    )
