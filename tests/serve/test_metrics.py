"""`routerkit.serve.metrics`: the Prometheus text format, written by hand."""

from __future__ import annotations

import pytest

from routerkit.serve.metrics import Histogram, ServeMetrics


def test_histograms_are_cumulative_with_sum_and_count() -> None:
    hist = Histogram([0.1, 1.0])
    for value in (0.05, 0.5, 0.7, 3.0):
        hist.observe(value)
    assert hist.lines("t") == [
        't_bucket{le="0.1"} 1',
        't_bucket{le="1"} 3',
        't_bucket{le="+Inf"} 4',
        "t_sum 4.25",
        "t_count 4",
    ]
    with pytest.raises(ValueError, match="increasing"):
        Histogram([1.0, 1.0])


def test_render_lists_every_family_with_help_and_type() -> None:
    metrics = ServeMetrics(['f0 "small"', "f1"])
    metrics.request("/v1/predict", 200)
    metrics.request("/v1/predict", 200)
    metrics.request("/v1/predict", 415)
    metrics.error("content_type")
    metrics.error("something_new")
    metrics.served([10, 6], gflops=0.25, gflops_largest=1.0, latency_s=0.02, windows=1)
    metrics.batch(3)
    text = metrics.render()
    assert text.endswith("\n")
    assert 'routerkit_requests_total{endpoint="/v1/predict",status="200"} 2' in text
    assert 'routerkit_requests_total{endpoint="/v1/predict",status="415"} 1' in text
    assert 'routerkit_errors_total{kind="content_type"} 1' in text and 'routerkit_errors_total{kind="internal"} 0' in text
    assert 'routerkit_errors_total{kind="something_new"} 1' in text
    assert 'routerkit_units_served_total{model="f0 \\"small\\""} 10' in text  # label values escaped
    assert "routerkit_gflops_served_total 0.25" in text and "routerkit_gflops_largest_total 1" in text
    assert 'routerkit_request_latency_seconds_bucket{le="0.025"} 1' in text
    assert 'routerkit_batch_size_bucket{le="2"} 0' in text and 'routerkit_batch_size_bucket{le="4"} 1' in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)) == sum(line.startswith("# HELP") for line in text.splitlines())
    with pytest.raises(ValueError, match="units for 2 models"):
        metrics.served([1], 0.0, 0.0, 0.0)
