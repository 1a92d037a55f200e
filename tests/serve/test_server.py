"""A real uvicorn server under concurrent load: batching, bad requests interleaved with good ones, batch independence."""

from __future__ import annotations

import io
import json
import random
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from routerkit.deploy import RoutedModel

if TYPE_CHECKING:
    from serve.conftest import LiveServer


@dataclass
class Call:
    """One request and what its answer must be."""

    name: str
    body: bytes
    content_type: str
    status: int
    kind: str | None = None  # the error kind of a bad request
    expected: Any = None  # the reference Prediction of a good one


def post(url: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


def _multipart(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "routerkit-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _bad_calls(png: bytes) -> list[Call]:
    rgb = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), (10, 200, 30), dtype=np.uint8)).save(rgb, format="PNG")
    form, form_type = _multipart("notes.txt", b"hello", "text/plain")
    kinds = [
        Call("text body", b"hello", "text/plain", 415, "content_type"),
        Call("undecodable", b"definitely not a png", "image/png", 400, "undecodable"),
        Call("truncated", png[: len(png) // 3], "image/png", 400, "undecodable"),
        Call("rgb", rgb.getvalue(), "image/png", 400, "channels"),
        Call("too large", b"\0" * 120_000, "image/tiff", 413, "too_large"),
        Call("empty", b"", "image/jpeg", 400, "empty"),
        Call("bad json", b'{"input": [[1, 2', "application/json", 400, "json"),
        Call("ragged", json.dumps({"input": [[1.0], [1.0, 2.0]]}).encode(), "application/json", 400, "shape"),
        Call("3 channels", json.dumps({"input": np.zeros((3, 32, 32)).tolist()}).encode(), "application/json", 400, "channels"),
        Call("not a file type", form, form_type, 415, "content_type"),
    ]
    return [Call(f"{c.name} #{i}", c.body, c.content_type, c.status, c.kind) for i in range(6) for c in kinds]  # 60


def _good_calls(reference: RoutedModel, scans: dict[str, list[Path]]) -> list[Call]:
    calls = []
    for path in scans["trained"]:  # raw PNG bodies, twice each
        expected = reference.predict(str(path))
        calls += [Call(f"{path.name} raw #{i}", path.read_bytes(), "image/png", 200, expected=expected) for i in range(2)]
    gen = torch.Generator().manual_seed(3)
    for i in range(6):  # model-space JSON
        x = torch.randn(1, 32, 32, generator=gen)
        calls.append(
            Call(f"json #{i}", json.dumps({"input": x.tolist()}).encode(), "application/json", 200, expected=reference.predict(x))
        )
    for path in scans["tiled"]:  # other sizes, as multipart uploads: routed alone
        body, content_type = _multipart(path.name, path.read_bytes(), "image/png")
        calls.append(Call(f"{path.name} tiled", body, content_type, 200, expected=reference.predict(str(path))))
    return calls


def _check(call: Call, status: int, body: dict[str, Any]) -> None:
    assert status == call.status, (call.name, status, body)
    if call.kind is not None:
        assert body["error"]["kind"] == call.kind and body["error"]["expected"], (call.name, body)
        return
    want = call.expected
    assert body["mask"] == want.pred[0].tolist(), call.name
    assert body["actions"] == want.actions[0].flatten().tolist(), call.name
    assert body["routing_map"] == want.routing_map[0].tolist(), call.name
    assert body["gflops"] == pytest.approx(float(want.gflops[0])), call.name
    assert body["windows"] == want.windows[0], call.name


def test_concurrent_good_and_bad_requests_are_each_answered(
    live_server: LiveServer, reference_model: RoutedModel, scans: dict[str, list[Path]]
) -> None:
    png = scans["trained"][0].read_bytes()
    calls = _good_calls(reference_model, scans) + _bad_calls(png)
    random.Random(0).shuffle(calls)  # bad ones interleaved with good ones
    url = f"{live_server.url}/v1/predict"
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda c: post(url, c.body, c.content_type), calls))
    for call, (status, body) in zip(calls, answers, strict=True):
        _check(call, status, body)
    good = [body for call, (_, body) in zip(calls, answers, strict=True) if call.kind is None]
    assert len(good) == 33 and len(calls) - len(good) == 60
    trained = [b for b in good if b["windows"] == 1]
    assert max(b["batch_inputs"] for b in trained) > 1, "no two requests were routed together"
    assert all(b["batch_inputs"] <= 8 for b in trained)  # --max-batch
    assert all(b["batch_inputs"] == 1 for b in good if b["windows"] > 1)  # tiled inputs are routed alone
    status, text = get(f"{live_server.url}/healthz")
    assert status == 200 and json.loads(text)["status"] == "ok"
    _, metrics = get(f"{live_server.url}/metrics")
    assert 'routerkit_errors_total{kind="undecodable"}' in metrics and "routerkit_batch_size_count" in metrics
    batched = [line for line in metrics.splitlines() if line.startswith('routerkit_batch_size_bucket{le="1"}')]
    count = next(line for line in metrics.splitlines() if line.startswith("routerkit_batch_size_count"))
    assert int(batched[0].split()[-1]) < int(count.split()[-1])  # some batches held more than one input


def test_an_answer_does_not_depend_on_the_batch_it_landed_in(live_server: LiveServer, scans: dict[str, list[Path]]) -> None:
    """f_0's MC-dropout masks are fixed (mask_seed=0): the same input alone or among others gets the same answer."""
    url = f"{live_server.url}/v1/predict"
    probe = scans["trained"][5].read_bytes()
    status, alone = post(url, probe, "image/png")
    assert status == 200 and alone["batch_inputs"] == 1
    others = [p.read_bytes() for p in scans["trained"][6:]]
    for _attempt in range(3):  # on a busy machine the probe may come first and alone: send the crowd again
        start = threading.Barrier(len(others) + 1)

        def send(body: bytes, start: threading.Barrier = start) -> dict[str, Any]:
            start.wait()
            return post(url, body, "image/png")[1]

        with ThreadPoolExecutor(max_workers=len(others) + 1) as pool:
            together = list(pool.map(send, [*others, probe]))[-1]
        if together["batch_inputs"] > 1:
            break
    assert together["batch_inputs"] > 1, "the probe was never batched with the others"
    for key in ("mask", "actions", "routing_map", "gflops"):
        assert together[key] == alone[key], key


def test_fixed_masks_make_the_state_independent_of_the_batch(served_model: RoutedModel, serve_run: Path) -> None:
    """Why the server loads the run with mask_seed=0: with masks drawn per batch, an input's state depends on its batch."""
    import routerkit

    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))

    def states(model: RoutedModel) -> tuple[torch.Tensor, torch.Tensor]:
        together = model.predict(x, uncertainty=True).uncertainty
        alone = torch.stack([model.predict(x[i : i + 1], uncertainty=True).uncertainty[0] for i in range(6)])  # type: ignore[index]
        return together, alone  # type: ignore[return-value]

    together, alone = states(served_model)
    assert torch.allclose(together, alone, atol=1e-6)
    fresh = routerkit.load(serve_run, checkpoint="calibrated")  # mask_seed=None: new masks for every batch
    together, alone = states(fresh)
    assert (together - alone).abs().amax(dim=(1, 2)).max() > 0.05
