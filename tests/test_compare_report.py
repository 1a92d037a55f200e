"""Table 2 states a GFLOPs ratio only for a real IoU match."""

from __future__ import annotations

from routerkit.compare import CompareReport, table2_markdown


def _report(matched: bool, idk_val_iou: float, ratio: float | None) -> CompareReport:
    table2 = {
        "target_val_iou": 0.868,
        "idk_val_iou": idk_val_iou,
        "matched_within_1e-3": matched,
        "paser": {"mean_iou": 0.868, "gflops": 0.2},
        "idk_iou_match": {"mean_iou": 0.566, "gflops": 0.5},
        "gflops_ratio_idk_over_paser": ratio,
    }
    return CompareReport("test", [], table2)


def test_unmatched_comparison_says_so_and_gives_no_ratio() -> None:
    text = table2_markdown(_report(False, 0.566, None))
    assert "Not a match" in text
    assert "30.20 IoU points below" in text
    assert "x PaSeR's GFLOPs" not in text


def test_matched_comparison_gives_the_ratio() -> None:
    text = table2_markdown(_report(True, 0.8675, 2.5))
    assert "IDK needs 2.50x PaSeR's GFLOPs" in text
    assert "Not a match" not in text
