"""`routerkit.serve.create_app` in process (FastAPI's TestClient): every endpoint, input kind and error kind."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from routerkit.data import DataSpec
from routerkit.deploy import Prediction, RoutedModel
from routerkit.deploy.export import manifest_of
from routerkit.deploy.writers import mask_pixels

pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (routerkit's test extra)")

from fastapi.testclient import TestClient

from routerkit.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def client(served_model: RoutedModel, serve_run: Path) -> Iterator[TestClient]:
    settings = ServeSettings(max_batch=4, max_wait_ms=5.0, max_bytes=50_000, max_pixels=80 * 80)
    with TestClient(create_app(served_model, settings, {"run_dir": str(serve_run)})) as test_client:
        yield test_client


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _check_answer(body: dict[str, Any], expected: Prediction) -> None:
    """``body`` (a JSON answer) says what ``reference.predict`` says for the same input."""
    assert expected.routing_map is not None
    assert body["mask"] == expected.pred[0].tolist()
    assert body["actions"] == expected.actions[0].flatten().tolist()
    assert body["routing_map"] == expected.routing_map[0].tolist()
    assert body["gflops"] == pytest.approx(float(expected.gflops[0]))
    assert body["windows"] == expected.windows[0]


# --- the happy paths ------------------------------------------------------------------------------


def test_healthz_info_and_page(client: TestClient, served_model: RoutedModel) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "models": served_model.model_names, "queue": 0}
    info = client.get("/v1/info").json()
    manifest = json.loads(json.dumps(manifest_of(served_model, {"run_dir": info["source"]["run_dir"]})))
    assert {k: info[k] for k in manifest} == manifest  # the manifest's fields, as an ONNX bundle would say
    assert info["model_names"] == ["f0_small", "f1_medium", "f2_large"] and info["grid"] == [4, 4]
    assert info["input_shape"] == [1, 32, 32] and info["unit_shape"] == [1, 8, 8]
    assert info["class_names"] == ["pore", "carbon", "nickel"] and info["mask_values"] == {"0": 0, "1": 255, "2": 128}
    assert info["state"]["masks"] == "fixed" and info["state"]["mask_seed"] == 0
    assert info["largest_model"] == "f2_large" and "multiply-add" in info["flop_convention"]
    unit = [m["unit_gflops"] for m in info["models"]]
    assert info["window_gflops"]["f2_large"] == pytest.approx(16 * unit[2])  # every unit, no state, no policy
    assert info["serve"]["max_batch"] == 4 and info["serve"]["max_bytes"] == 50_000
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        static = client.get(f"/static/{name}")
        assert static.status_code == 200 and kind in static.headers["content-type"]


def test_raw_image_multipart_and_json_give_the_models_answer(
    client: TestClient, reference_model: RoutedModel, scans: dict[str, list[Path]]
) -> None:
    path = scans["trained"][0]
    expected = reference_model.predict(str(path))
    raw = client.post("/v1/predict", content=_png(path), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    _check_answer(body, expected)
    assert body["name"] == "input" and body["task"] == "segmentation" and body["shape"] == [32, 32]
    assert body["action_names"] == [body["model_names"][a] for a in body["actions"]]
    assert sum(body["usage"].values()) == pytest.approx(1.0) and body["latency_ms"] > 0
    assert body["gflops_largest"] == pytest.approx(client.get("/v1/info").json()["window_gflops"]["f2_large"])
    assert body["gflops_saved"] == pytest.approx(1 - body["gflops"] / body["gflops_largest"])
    form = client.post("/v1/predict", files={"file": ("scan.png", _png(path), "image/png")})
    assert form.status_code == 200 and form.json()["name"] == "scan.png"
    _check_answer(form.json(), expected)
    x = torch.randn(1, 32, 32)
    data = client.post("/v1/predict", json={"input": x.tolist()})
    assert data.status_code == 200, data.text
    _check_answer(data.json(), reference_model.predict(x))
    grayscale = client.post("/v1/predict", json={"input": x[0].tolist()})  # [H, W] for a one-channel run
    assert grayscale.json()["mask"] == data.json()["mask"]


def test_tiled_input_is_routed_alone_and_stitched(
    client: TestClient, reference_model: RoutedModel, scans: dict[str, list[Path]]
) -> None:
    path = scans["tiled"][0]  # 40 x 70: 2 x 3 windows
    expected = reference_model.predict(str(path))
    answer = client.post("/v1/predict", files={"file": (path.name, _png(path), "application/octet-stream")})  # by suffix
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["windows"] == 6 and body["shape"] == [40, 70] and body["batch_inputs"] == 1
    _check_answer(body, expected)
    assert len(body["actions"]) == 6 * 16 and np.array(body["routing_map"]).shape == (5, 9)
    info = client.get("/v1/info").json()
    assert body["gflops_largest"] == pytest.approx(6 * info["window_gflops"]["f2_large"])


def test_png_format_is_the_mask_in_the_data_sets_values(
    client: TestClient, reference_model: RoutedModel, scans: dict[str, list[Path]]
) -> None:
    path = scans["trained"][1]
    body = client.post("/v1/predict?format=png", content=_png(path), headers={"Content-Type": "image/png"}).json()
    assert "mask" not in body
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert np.array_equal(mask, mask_pixels(reference_model.predict(str(path)).pred[0], reference_model.spec))


def test_page_format_has_the_pictures(client: TestClient, scans: dict[str, list[Path]]) -> None:
    body = client.post("/v1/predict?format=page", content=_png(scans["trained"][2]), headers={"Content-Type": "image/png"})
    assert body.status_code == 200, body.text
    images = body.json()["images"]
    assert set(images) == {"input", "uncertainty", "routing", "mask"}
    sizes = set()
    for uri in images.values():
        assert uri.startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        sizes.add(picture.size)
    assert sizes == {(256, 256)}  # 32 x 32 enlarged 8 times, like routerkit predict's overlays
    assert body.json()["uncertainty_range"] == [0.0, pytest.approx(np.log(3))]


def test_a_model_without_fixed_masks_is_served_with_a_warning(serve_run: Path) -> None:
    import routerkit

    with pytest.warns(UserWarning, match=r"mask_seed=0"):
        create_app(routerkit.load(serve_run, checkpoint="calibrated"))


def test_predict_returns_f0s_uncertainty_when_asked(served_model: RoutedModel, scans: dict[str, list[Path]]) -> None:
    x = torch.randn(3, 1, 32, 32)
    out = served_model.predict(x, uncertainty=True)
    state = served_model.pipeline.route(x, served_model.router).base.uncertainty
    assert out.uncertainty is not None and out.uncertainty.shape == (3, 32, 32)
    assert torch.allclose(out.uncertainty, state.float(), atol=1e-6)
    assert served_model.predict(x).uncertainty is None
    tiled = served_model.predict(str(scans["tiled"][2]), uncertainty=True)  # 64 x 33: 2 x 2 windows, cropped
    assert isinstance(tiled.uncertainty, list) and tiled.uncertainty[0].shape == (64, 33)


# --- bad requests ---------------------------------------------------------------------------------


def _bad_cases(scans_trained: Path) -> list[tuple[str, dict, int, str, str]]:
    rgb = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(rgb, format="PNG")
    big = io.BytesIO()
    Image.fromarray(np.zeros((90, 90), dtype=np.uint8)).save(big, format="PNG")
    png = scans_trained.read_bytes()
    return [
        ("content type", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "content_type", "image/png"),
        ("no content type", {"content": png}, 415, "content_type", "multipart/form-data"),
        ("too large", {"content": b"\0" * 60_000, "headers": {"Content-Type": "image/png"}}, 413, "too_large", "50000 bytes"),
        ("empty", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty", "image/png"),
        ("undecodable", {"content": b"not a png", "headers": {"Content-Type": "image/png"}}, 400, "undecodable", "PNG"),
        ("truncated", {"content": png[:100], "headers": {"Content-Type": "image/png"}}, 400, "undecodable", "PNG"),
        ("rgb", {"content": rgb.getvalue(), "headers": {"Content-Type": "image/png"}}, 400, "channels", "1 channel"),
        ("too many pixels", {"content": big.getvalue(), "headers": {"Content-Type": "image/png"}}, 413, "too_large", "6400"),
        ("bad json", {"content": b'{"input": [', "headers": {"Content-Type": "application/json"}}, 400, "json", "[1, 32, 32]"),
        ("no input key", {"json": {"image": [1, 2]}}, 400, "json", '"input"'),
        ("ragged", {"json": {"input": [[1.0, 2.0], [3.0]]}}, 400, "shape", "[1, 32, 32]"),
        ("strings", {"json": {"input": [["a", "b"]]}}, 400, "shape", "[1, 32, 32]"),
        ("batch of two", {"json": {"input": np.zeros((2, 1, 32, 32)).tolist()}}, 400, "shape", "[1, 32, 32]"),
        ("3 channels", {"json": {"input": np.zeros((3, 8, 8)).tolist()}}, 400, "channels", "1 channel"),
        (
            "nan",
            {"content": b'{"input": [[NaN, 1.0]]}', "headers": {"Content-Type": "application/json"}},
            400,
            "values",
            "finite",
        ),
        (
            "no file field",
            {"data": {"other": "1"}, "files": {"upload": ("x.txt", b"x", "text/plain")}},
            400,
            "content_type",
            "file",
        ),
        ("unknown file type", {"files": {"file": ("x.bmp", b"BM...", "image/bmp")}}, 415, "content_type", ".png"),
        ("npy garbage", {"content": b"\x93NUMPY", "headers": {"Content-Type": "application/x-npy"}}, 400, "undecodable", ".npy"),
    ]


def test_every_bad_request_gets_a_json_error_naming_what_was_expected(client: TestClient, scans: dict[str, list[Path]]) -> None:
    for name, kwargs, status, kind, expected in _bad_cases(scans["trained"][0]):
        response = client.post("/v1/predict", **kwargs)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["kind"] == kind, (name, error)
        assert expected in f"{error['message']} {error['expected']}", (name, error)
    assert (
        client.post("/v1/predict?format=svg", content=b"x", headers={"Content-Type": "image/png"}).json()["error"]["kind"]
        == "format"
    )
    assert client.get("/v1/nothing").json()["error"]["kind"] == "not_found"
    assert client.get("/v1/predict").json()["error"]["kind"] == "method_not_allowed"
    good = client.post("/v1/predict", content=_png(scans["trained"][3]), headers={"Content-Type": "image/png"})
    assert good.status_code == 200  # still serving


# --- /metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def test_metrics_are_prometheus_text(client: TestClient, scans: dict[str, list[Path]]) -> None:
    before = client.get("/metrics").text
    client.post("/v1/predict", content=_png(scans["trained"][4]), headers={"Content-Type": "image/png"})
    client.post("/v1/predict", content=b"junk", headers={"Content-Type": "image/png"})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or _SAMPLE.match(line), line

    def value(sample: str, body: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", body, re.M)
        return float(match.group(1)) if match else 0.0

    assert (
        value('routerkit_requests_total{endpoint="/v1/predict",status="200"}', text)
        == value('routerkit_requests_total{endpoint="/v1/predict",status="200"}', before) + 1
    )
    assert (
        value('routerkit_errors_total{kind="undecodable"}', text)
        == value('routerkit_errors_total{kind="undecodable"}', before) + 1
    )
    units = sum(value(f'routerkit_units_served_total{{model="{m}"}}', text) for m in ("f0_small", "f1_medium", "f2_large"))
    assert units == 16 * value("routerkit_windows_total", text) > 0
    assert value("routerkit_gflops_served_total", text) > 0 and value("routerkit_gflops_largest_total", text) > 0
    assert value('routerkit_request_latency_seconds_bucket{le="+Inf"}', text) == value("routerkit_inputs_total", text)
    assert value("routerkit_batch_size_count", text) >= 1
    assert "# TYPE routerkit_request_latency_seconds histogram" in text


# --- a classification run -------------------------------------------------------------------------


def test_a_classification_run_answers_a_label() -> None:
    from routerkit import RoutedPipeline, WholeInput, Zoo, create_router
    from routerkit.models import ToyClassifier

    torch.manual_seed(0)
    zoo = Zoo([ToyClassifier(64, 3, 4, dropout=0.2), ToyClassifier(64, 3, 32)]).eval()
    pipe = RoutedPipeline(zoo, WholeInput(), "mc_dropout", "flops", (1, 8, 8))
    router = create_router("single", num_actions=2, grid_shape=(1, 1), index=1)
    model = RoutedModel(pipe, router, DataSpec((1, 8, 8), ["a", "b", "c"], task="classification"), mask_seed=0)
    with TestClient(create_app(model)) as test_client:
        x = torch.randn(1, 8, 8)
        body = test_client.post("/v1/predict?format=page", json={"input": x.tolist()}).json()
        label = int(model.predict(x).pred[0])
        assert body["label"] == label and body["class_name"] == "abc"[label] and body["model"] == "f1"
        assert set(body["images"]) == {"input"} and "mask" not in body and "routing_map" not in body
        wrong = test_client.post("/v1/predict", json={"input": np.zeros((1, 8, 9)).tolist()}).json()["error"]
        assert wrong["kind"] == "shape" and "[1, 8, 8]" in wrong["expected"]
        assert test_client.post("/v1/predict?format=png", json={"input": x.tolist()}).json()["error"]["kind"] == "format"
        assert test_client.get("/v1/info").json()["task"] == "classification"
