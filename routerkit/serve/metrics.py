"""What ``GET /metrics`` answers: counters and histograms in the Prometheus text format, written by hand.

No client library: `ServeMetrics` keeps a few counters and two histograms behind one lock (the
batch worker thread and the event loop both record) and `ServeMetrics.render` writes them in the
`text exposition format <https://prometheus.io/docs/instrumenting/exposition_formats/>`_
(``# HELP`` / ``# TYPE`` lines, ``name{label="value"} number``, cumulative ``_bucket{le=...}``
lines with ``_sum`` and ``_count`` for a histogram).

Example:
    >>> metrics = ServeMetrics(["f0", "f1"])
    >>> metrics.request("/v1/predict", 200)
    >>> metrics.served([3, 1], gflops=0.5, gflops_largest=1.0, latency_s=0.02)
    >>> print([line for line in metrics.render().splitlines() if line.startswith("routerkit_units")][0])
    routerkit_units_served_total{model="f0"} 3
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

__all__ = ["BATCH_BUCKETS", "ERROR_KINDS", "LATENCY_BUCKETS", "CONTENT_TYPE", "Histogram", "ServeMetrics"]

#: The media type of the text format (version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Upper bounds (seconds) of the request latency histogram.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds of the histogram of inputs routed together.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Error kinds that are always listed (at 0 until one happens); others are added when they occur.
ERROR_KINDS = (
    "content_type",
    "too_large",
    "empty",
    "undecodable",
    "json",
    "shape",
    "channels",
    "format",
    "overloaded",
    "internal",
)


def _escape(value: str) -> str:
    """A label value as the text format quotes it (backslash, double quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value: integers without a decimal point, ``+Inf`` / ``-Inf`` / ``NaN`` as the format spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in pairs)
    return "{" + inner + "}" if inner else ""


class Histogram:
    """A cumulative histogram with fixed upper bounds (``+Inf`` added).

    Args:
        bounds: Increasing upper bounds of the buckets.

    Raises:
        ValueError: Bounds that are empty or not increasing.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"Expected increasing histogram bounds but got {list(bounds)}.")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self.counts[index] += 1
        self.sum += float(value)
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket`` (cumulative), ``_sum`` and ``_count`` sample lines."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class ServeMetrics:
    """The server's counters: requests, errors, units per model, latency, GFLOPs and batch sizes.

    Every method is thread-safe.

    Args:
        model_names: Name of each model index (units served are counted per model, all listed from 0).
        latency_buckets: Upper bounds (seconds) of the latency histogram.
        batch_buckets: Upper bounds of the batch-size histogram.
    """

    def __init__(
        self,
        model_names: Sequence[str],
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
        batch_buckets: Sequence[float] = BATCH_BUCKETS,
    ) -> None:
        self.model_names = list(model_names)
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.units = [0] * len(self.model_names)
        self.inputs = 0
        self.windows = 0
        self.gflops = 0.0
        self.gflops_largest = 0.0
        self.latency = Histogram(latency_buckets)
        self.batches = Histogram(batch_buckets)
        self.queue_depth = 0

    def request(self, endpoint: str, status: int) -> None:
        """Count one answered request (``endpoint``: the route's path, ``status``: the HTTP status)."""
        key = (endpoint, str(int(status)))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def error(self, kind: str) -> None:
        """Count one refused or failed request of ``kind`` (`ERROR_KINDS`, or a new kind)."""
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def served(self, units: Sequence[int], gflops: float, gflops_largest: float, latency_s: float, windows: int = 1) -> None:
        """Count one input answered.

        Args:
            units: Units answered by each model index (over all of the input's windows).
            gflops: GFLOPs spent on it.
            gflops_largest: GFLOPs the largest model alone would have spent.
            latency_s: Seconds from receiving the request to answering it.
            windows: Windows of the trained shape it took.

        Raises:
            ValueError: ``units`` has another length than the models.
        """
        if len(units) != len(self.units):
            raise ValueError(f"Expected units for {len(self.units)} models but got {len(units)}.")
        with self._lock:
            self.units = [a + int(b) for a, b in zip(self.units, units, strict=True)]
            self.inputs += 1
            self.windows += int(windows)
            self.gflops += float(gflops)
            self.gflops_largest += float(gflops_largest)
            self.latency.observe(latency_s)

    def batch(self, size: int) -> None:
        """Count one batch of ``size`` inputs routed together."""
        with self._lock:
            self.batches.observe(size)

    def set_queue_depth(self, depth: int) -> None:
        """The inputs waiting for the model now."""
        with self._lock:
            self.queue_depth = int(depth)

    def render(self) -> str:
        """Everything in the Prometheus text format (ends with a newline)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("routerkit_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f"routerkit_requests_total{_labels([('endpoint', endpoint), ('status', status)])} {count}")
            family("routerkit_errors_total", "counter", "Requests refused or failed, by kind of error.")
            for kind, count in sorted(self.errors.items()):
                lines.append(f"routerkit_errors_total{_labels([('kind', kind)])} {count}")
            family("routerkit_inputs_total", "counter", "Inputs answered.")
            lines.append(f"routerkit_inputs_total {self.inputs}")
            family("routerkit_windows_total", "counter", "Windows of the trained shape routed (a tiled input takes several).")
            lines.append(f"routerkit_windows_total {self.windows}")
            family("routerkit_units_served_total", "counter", "Units answered, by the model that answered them.")
            for name, count in zip(self.model_names, self.units, strict=True):
                lines.append(f"routerkit_units_served_total{_labels([('model', name)])} {count}")
            family(
                "routerkit_gflops_served_total",
                "counter",
                "GFLOPs spent on the inputs answered (every pass that ran; fvcore: one multiply-add = one flop).",
            )
            lines.append(f"routerkit_gflops_served_total {_number(self.gflops)}")
            family("routerkit_gflops_largest_total", "counter", "GFLOPs the largest model alone would have spent on them.")
            lines.append(f"routerkit_gflops_largest_total {_number(self.gflops_largest)}")
            family("routerkit_request_latency_seconds", "histogram", "Server-side latency of answered predictions.")
            lines.extend(self.latency.lines("routerkit_request_latency_seconds"))
            family("routerkit_batch_size", "histogram", "Inputs routed together in one batch.")
            lines.extend(self.batches.lines("routerkit_batch_size"))
            family("routerkit_queue_depth", "gauge", "Inputs waiting for the model.")
            lines.append(f"routerkit_queue_depth {self.queue_depth}")
        return "\n".join(lines) + "\n"
