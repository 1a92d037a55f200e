"""Serving under load: ``routerkit serve`` on a finished run, routed vs the largest model on every unit.

Starts the server of ``routerkit serve`` in this process (`routerkit.serve.create_app` behind
uvicorn in a thread, on 127.0.0.1 and a port the system picks), twice on the same resources and
with the same settings:

1. **routed**: the run as trained, as ``routerkit serve RUN`` loads it (``routerkit.load(run,
   mask_seed=0)``: f_0's MC-dropout masks fixed);
2. **always largest**: the same run with its router replaced by a `SingleModelRouter` sending
   every unit to the costliest model (f_0 then does not run; the answers' ``gflops`` equal their
   ``gflops_largest``).

Each server gets ``--warmup`` requests first (not counted), then ``--requests`` ``POST
/v1/predict`` requests from ``--concurrency`` client threads (``http.client``, one keep-alive
connection per thread, loopback only), with inputs of the trained shape: synthetic battery scans
(``battery_plugin.synthetic.generate_battery`` with the run's generator knobs, sent as 16-bit PNG
bodies, as ``examples/battery_plugin/export_scans.py`` writes them) when the run is a battery run,
else random model-space inputs as JSON ``{"input": ...}`` bodies.

Prints the machine, then per deployment: requests, failures (any answer but 200, or no answer),
throughput (requests per second of wall clock), client-side latency p50 / p95 / p99 (ms), mean
batch size (``routerkit_batch_size`` of ``/metrics``, the measured requests only), GFLOPs per
request (the answers' ``gflops``, fvcore convention), the share of units per model, and the
routed-vs-largest throughput ratio; then whether issue 14's target is met (routed throughput at
least 2x always-largest, no failed request: meant for the default battery run on a CPU). Exits
non-zero when a request failed.

The client runs in a process of its own (``--client process``, the default; a spawned child, as
a load generator such as ``wrk`` would be) and shares only the cores with the server, not its
GIL. ``--client thread`` sends from threads of the server's process instead (as in the serve
tests): their HTTP and JSON work then takes the GIL from the server's event loop, the same for
both deployments, which dilutes the ratio.

Usage:
    python benchmarks/serve_load.py RUN_DIR [--requests 400] [--concurrency 8] [--max-batch 32] [--max-wait-ms 10]
        [--threads N] [--warmup 20] [--checkpoint NAME] [--format json|png] [--client process|thread]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import multiprocessing
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from _machine import machine_line

from routerkit.deploy import RoutedModel
from routerkit.routers.baselines import SingleModelRouter
from routerkit.training.run_dir import RunModels

if TYPE_CHECKING:
    from routerkit.serve import ServeSettings

#: Issue 14's target: routed throughput at least this multiple of always-largest.
TARGET_RATIO = 2.0
#: Seed of the synthetic scans and random inputs (the training data use seeds 0, 1, 2).
INPUT_SEED = 100
#: Distinct inputs generated at most; the requests cycle through them.
MAX_DISTINCT = 64
#: Deployment names, in the order they are measured.
ROUTED, LARGEST = "routed", "always largest"


@dataclass
class Body:
    """One request body ready to send."""

    data: bytes
    content_type: str


@dataclass
class Outcome:
    """What one request got back.

    Attributes:
        ok: HTTP 200 with a JSON answer.
        latency_s: Client-side seconds from sending the request to reading the whole answer.
        gflops: The answer's ``gflops`` (NaN when it failed).
        usage: The answer's share of units per model (empty when it failed).
        error: Why it failed (``None`` when it did not).
    """

    ok: bool
    latency_s: float
    gflops: float = float("nan")
    usage: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Row:
    """One deployment's line of the table.

    Attributes:
        deployment: ``routed`` or ``always largest``.
        requests: Requests sent (warm-up excluded).
        failures: Requests not answered with 200.
        seconds: Wall clock of the measured requests.
        throughput: Requests answered per second (failures excluded).
        p50_ms: Median client-side latency (ms) of the answered requests.
        p95_ms: 95th percentile latency (ms).
        p99_ms: 99th percentile latency (ms).
        mean_batch: Mean inputs per model call over the measured requests (``/metrics``).
        gflops: Mean GFLOPs per answered request.
        mix: Share of units answered by each model, over the answered requests.
        errors: Distinct failure messages (at most 5).
    """

    deployment: str
    requests: int
    failures: int
    seconds: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float
    gflops: float
    mix: dict[str, float]
    errors: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ the machine and the run


def load_parts(parser: argparse.ArgumentParser, run_dir: str, checkpoint: str | None, trust_remote_code: bool) -> RunModels:
    """The run's routing parts on the CPU (`routerkit.training.run_dir.load_routing`), or a clear error (exit 2)."""
    from routerkit.config import ConfigError
    from routerkit.training.run_dir import load_routing

    path = Path(run_dir)
    if not path.is_dir():
        parser.error(f"RUN_DIR {path} is not a directory: expected a run directory written by `routerkit train`.")
    if not (path / "config.yaml").exists():
        parser.error(f"RUN_DIR {path} is not a run directory (no config.yaml): expected one written by `routerkit train`.")
    try:
        return load_routing(path, checkpoint, trust_remote_code, device="cpu")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        parser.error(f"cannot load RUN_DIR {path}: {err}")


def costliest(model: RoutedModel) -> int:
    """Index of the costliest model on one unit (ties: the later one), the answers' ``largest_model``."""
    unit_flops = model.pipeline.accountant.unit_flops
    return max(range(len(unit_flops)), key=lambda i: (unit_flops[i], i))


def deployments(parts: RunModels, mask_seed: int = 0) -> dict[str, RoutedModel]:
    """The routed model (as ``routerkit.load(run, mask_seed=...)`` builds it) and the always-largest one.

    Both are built from the same loaded parts: `RoutedModel` routes on an inference copy of the
    pipeline, so the parts are not changed by the first.
    """
    router = parts.router
    routed = RoutedModel(parts.pipeline, router, parts.spec, seed=0, mask_seed=mask_seed)
    index = costliest(routed)
    single = SingleModelRouter(
        len(parts.zoo), index=index, grid_shape=router.grid_shape, in_channels=router.in_channels, spatial=router.spatial
    )
    largest = RoutedModel(parts.pipeline, single, parts.spec, seed=0, mask_seed=mask_seed)
    return {ROUTED: routed, LARGEST: largest}


def is_battery_run(parts: RunModels) -> bool:
    """Whether the run's data come from ``examples/battery_plugin`` (its scans can then be generated)."""
    module = parts.config.data.factory.split(":")[0]
    return module.split(".")[0] == "battery_plugin"


def make_bodies(parts: RunModels, count: int, seed: int = INPUT_SEED) -> tuple[list[Body], str]:
    """``count`` request bodies of the trained shape (at most `MAX_DISTINCT` distinct ones) and what they are.

    Battery runs: synthetic scans of ``battery_plugin.synthetic.generate_battery`` (the run's
    ``data.params.generator`` knobs) as 16-bit grayscale PNGs; other runs: standard-normal
    model-space inputs as JSON bodies.
    """
    shape = tuple(parts.spec.input_shape)
    distinct = max(1, min(count, MAX_DISTINCT))
    if is_battery_run(parts) and len(shape) == 3 and shape[0] == 1:
        from battery_plugin.synthetic import generate_battery  # importable: loading the run put its plugin folder on the path
        from PIL import Image

        knobs = dict(parts.config.data.params.get("generator") or {})
        images, _, _ = generate_battery(distinct, shape[1], shape[2], seed=seed, **knobs)
        bodies = []
        for image in images:
            pixels = np.round(image[0].numpy().astype(np.float64).clip(0.0, 1.0) * 65535).astype(np.uint16)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            bodies.append(Body(buffer.getvalue(), "image/png"))
        what = f"synthetic battery scans (generate_battery, seed {seed}), 16-bit PNG bodies"
    else:
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.randn((distinct, *shape), generator=gen)
        bodies = [Body(json.dumps({"input": x.tolist()}).encode(), "application/json") for x in inputs]
        what = f"random model-space inputs N(0, 1) (seed {seed}), JSON bodies"
    return [bodies[i % distinct] for i in range(count)], f"{distinct} distinct {what} of shape {list(shape)}"


# ------------------------------------------------------------------------------ the server and the client


@contextlib.contextmanager
def live_server(
    model: RoutedModel, settings: ServeSettings, source: dict[str, Any], start_timeout_s: float = 60.0
) -> Iterator[int]:
    """`create_app` on ``model`` behind uvicorn in a thread on 127.0.0.1; yields the port, stops the server after.

    Raises:
        RuntimeError: The server did not start within ``start_timeout_s``.
    """
    import uvicorn

    from routerkit.serve import create_app

    app = create_app(model, settings, source)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="serve-load-uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"Expected the server on 127.0.0.1:{port} to start within {start_timeout_s:g} s; it did not.")
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: Body | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": body.content_type} if body is not None else {}
    conn.request(method, path, body=body.data if body is not None else None, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def send_all(port: int, bodies: Sequence[Body], concurrency: int, path: str, timeout_s: float) -> tuple[list[Outcome], float]:
    """Send every body once from ``concurrency`` threads (one keep-alive connection each); outcomes in order, wall seconds."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    lock = threading.Lock()
    counter = iter(range(len(bodies)))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    status, data = _request(conn, "POST", path, bodies[i])
                except (OSError, http.client.HTTPException) as err:
                    outcomes[i] = Outcome(False, time.perf_counter() - t0, error=f"no answer: {type(err).__name__}: {err}")
                    conn.close()  # reconnects on the next request
                    continue
                latency = time.perf_counter() - t0
                outcomes[i] = _outcome(status, data, latency)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, name=f"serve-load-client-{k}", daemon=True) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return [o if o is not None else Outcome(False, 0.0, error="not sent (a client thread died)") for o in outcomes], seconds


def _outcome(status: int, data: bytes, latency: float) -> Outcome:
    """One answer as an `Outcome`: 200 with the JSON fields the table needs, else the server's error message."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return Outcome(False, latency, error=f"HTTP {status} with a body that is not JSON ({data[:80]!r})")
    if status != 200:
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        return Outcome(False, latency, error=f"HTTP {status} {err.get('kind')}: {err.get('message')}")
    return Outcome(True, latency, float(doc["gflops"]), {k: float(v) for k, v in doc.get("usage", {}).items()})


def batch_counts(port: int, timeout_s: float = 30.0) -> tuple[float, float]:
    """``routerkit_batch_size`` histogram's ``_sum`` and ``_count`` from ``GET /metrics``.

    Raises:
        RuntimeError: ``/metrics`` did not answer 200 or lacks the histogram.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        status, data = _request(conn, "GET", "/metrics")
    finally:
        conn.close()
    text = data.decode("utf-8", "replace")
    values = {}
    for name in ("sum", "count"):
        match = re.search(rf"^routerkit_batch_size_{name} (\S+)$", text, re.MULTILINE)
        if status != 200 or match is None:
            raise RuntimeError(f"Expected GET /metrics to answer 200 with routerkit_batch_size_{name} but got HTTP {status}.")
        values[name] = float(match.group(1))
    return values["sum"], values["count"]


#: How `measure` sends a list of bodies: ``(port, bodies, concurrency, path, timeout_s) -> (outcomes, seconds)``.
Sender = Callable[[int, Sequence[Body], int, str, float], tuple[list[Outcome], float]]


@contextlib.contextmanager
def client_process() -> Iterator[Sender]:
    """A `Sender` that runs `send_all` in a spawned child process (started once, reused), stopped after.

    The child imports this module once before it is used, so no request waits for its start.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(time.sleep, 0).result()  # start the child and import its modules before any request

        def send(port: int, bodies: Sequence[Body], concurrency: int, path: str, timeout_s: float) -> tuple[list[Outcome], float]:
            return pool.submit(send_all, port, list(bodies), concurrency, path, timeout_s).result()

        yield send


def measure(
    name: str,
    model: RoutedModel,
    settings: ServeSettings,
    source: dict[str, Any],
    bodies: Sequence[Body],
    warmup: Sequence[Body],
    concurrency: int,
    path: str,
    timeout_s: float,
    sender: Sender = send_all,
) -> Row:
    """One deployment: a fresh server, the warm-up requests, then the measured ones (sent by ``sender``); its `Row`."""
    with live_server(model, settings, source) as port:
        if warmup:
            sender(port, warmup, concurrency, path, timeout_s)
        sum0, count0 = batch_counts(port)
        outcomes, seconds = sender(port, bodies, concurrency, path, timeout_s)
        sum1, count1 = batch_counts(port)
    good = [o for o in outcomes if o.ok]
    latencies = 1000.0 * np.asarray([o.latency_s for o in good]) if good else np.full(1, np.nan)
    p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    names = model.model_names
    mix = {n: float(np.mean([o.usage.get(n, 0.0) for o in good])) if good else float("nan") for n in names}
    errors = list(dict.fromkeys(o.error for o in outcomes if o.error is not None))[:5]
    return Row(
        deployment=name,
        requests=len(outcomes),
        failures=len(outcomes) - len(good),
        seconds=seconds,
        throughput=len(good) / seconds if seconds > 0 else float("nan"),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_batch=(sum1 - sum0) / (count1 - count0) if count1 > count0 else float("nan"),
        gflops=float(np.mean([o.gflops for o in good])) if good else float("nan"),
        mix=mix,
        errors=errors,
    )


# ------------------------------------------------------------------------------ the table


def ratio(rows: Sequence[Row]) -> float:
    """Routed throughput over always-largest throughput."""
    by_name = {r.deployment: r for r in rows}
    largest = by_name[LARGEST].throughput
    return by_name[ROUTED].throughput / largest if largest > 0 else float("nan")


def _cell(value: float, digits: int, suffix: str = "") -> str:
    """A number of the table, ``n/a`` when there is none (no request answered)."""
    return f"{value:.{digits}f}{suffix}" if np.isfinite(value) else "n/a"


def print_table(rows: Sequence[Row]) -> None:
    """The markdown table, one row per deployment, and the failures' messages."""
    names = list(rows[0].mix)
    print(
        "| deployment | requests | failures | throughput (req/s) | p50 ms | p95 ms | p99 ms | mean batch "
        f"| GFLOPs / request | units {' / '.join(names)} | throughput vs always largest |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    largest = next(r for r in rows if r.deployment == LARGEST).throughput
    for r in rows:
        mix = " / ".join(_cell(r.mix[n], 2) for n in names)
        vs = r.throughput / largest if largest > 0 else float("nan")
        cells = [_cell(v, 1) for v in (r.throughput, r.p50_ms, r.p95_ms, r.p99_ms)]
        cells += [_cell(r.mean_batch, 2), _cell(r.gflops, 4), mix, _cell(vs, 2, "x")]
        print(f"| {r.deployment} | {r.requests} | {r.failures} | {' | '.join(cells)} |")
    for r in rows:
        for message in r.errors:
            print(f"failure ({r.deployment}): {message}")


def main(argv: list[str] | None = None) -> list[Row]:
    """Serve the run twice under the same load; print the table and the target's verdict; return the rows.

    Raises:
        SystemExit: Bad arguments, a run that cannot be loaded, or no serve extra (exit 2).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `routerkit train`")
    parser.add_argument("--requests", type=int, default=400, help="measured requests per deployment (default: 400)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads sending at once (default: 8)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the server's --max-wait-ms (default: 10)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=20, help="requests per deployment before measuring (default: 20)")
    parser.add_argument("--checkpoint", help="checkpoint name, e.g. 'calibrated' (default: the final one)")
    parser.add_argument("--format", choices=("json", "png"), default="json", help="answer format (default: json)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default: 120)")
    parser.add_argument(
        "--client",
        choices=("process", "thread"),
        default="process",
        help="send from a process of its own (default) or from threads of the server's process",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="import the plugin code of a run not trained here")
    args = parser.parse_args(argv)
    for flag, least in (("requests", 1), ("concurrency", 1), ("max_batch", 1), ("threads", 1), ("warmup", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            parser.error(f"expected --{flag.replace('_', '-')} >= {least} but got {value}.")
    if not args.max_wait_ms >= 0 or not args.timeout > 0:
        parser.error(f"expected --max-wait-ms >= 0 and --timeout > 0 but got {args.max_wait_ms} and {args.timeout}.")
    try:
        from routerkit.serve import ServeSettings
    except ImportError as err:
        parser.error(str(err))
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        parser.error("this benchmark needs uvicorn: pip install 'routerkit[serve]'.")
    if args.threads:
        torch.set_num_threads(args.threads)

    parts = load_parts(parser, args.run_dir, args.checkpoint, args.trust_remote_code)
    models = deployments(parts)
    bodies, inputs = make_bodies(parts, args.requests + args.warmup)
    warmup, measured = bodies[: args.warmup], bodies[args.warmup :]
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    source = {"run_dir": str(Path(args.run_dir).resolve()), "checkpoint": args.checkpoint}
    path = f"/v1/predict?format={args.format}"
    routed = models[ROUTED]
    names = routed.model_names

    print(machine_line())
    params = " / ".join(f"{n} {p:,}" for n, p in zip(names, routed.zoo.num_parameters(), strict=True))
    print(
        f"run: {args.run_dir} (checkpoint {args.checkpoint or 'final'}) | zoo {params} params "
        f"| input {'x'.join(map(str, parts.spec.input_shape))}, {routed.pipeline.partitioner!r} "
        f"| router {type(parts.router).__name__}"
    )
    print(f"server: 127.0.0.1, in-process uvicorn | max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms | POST {path}")
    print(
        f"client: {args.requests} requests per deployment at concurrency {args.concurrency} (http.client threads, keep-alive, "
        f"{'in a process of their own' if args.client == 'process' else 'in the server process'}) "
        f"after {args.warmup} warm-up requests | inputs: {inputs}"
    )
    print(f"always largest: every unit to {names[costliest(routed)]} (SingleModelRouter; f_0 does not run)\n")

    t0 = time.perf_counter()
    with client_process() if args.client == "process" else contextlib.nullcontext(send_all) as sender:
        rows = [
            measure(name, model, settings, source, measured, warmup, args.concurrency, path, args.timeout, sender)
            for name, model in models.items()
        ]
    print_table(rows)
    failures = sum(r.failures for r in rows)
    speed_up = ratio(rows)
    met = speed_up >= TARGET_RATIO and failures == 0
    print(
        f"\nTarget (issue 14, the default battery run on a CPU): routed throughput >= {TARGET_RATIO:g}x always largest "
        f"with no failed request: {'met' if met else 'not met'} ({_cell(speed_up, 2, 'x')}, {failures} failed request(s))."
    )
    print(f"({time.perf_counter() - t0:.0f} s; GFLOPs in the fvcore convention: one multiply-add = one flop)")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(row.failures for row in main()) else 0)
