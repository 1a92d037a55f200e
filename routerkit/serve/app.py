"""The HTTP service of ``routerkit serve``: `create_app` builds a FastAPI app around one `RoutedModel`.

Endpoints:

- ``POST /v1/predict``: one input, as the raw body with an image content type (``image/png``,
  ``image/tiff``, ``image/jpeg``; ``application/x-npy`` for a ``.npy`` file), as multipart/form-data
  with a ``file`` field, or as ``application/json`` ``{"input": nested array}`` in model space
  (``[C, H, W]``, ``[H, W]`` for one channel, or ``[1, C, H, W]``). Files are read as
  ``routerkit predict`` reads them (the run's scaling and normalisation); inputs of another size
  are tiled. ``?format=json`` (default), ``png`` or ``page``: see `routerkit.serve.render`.
- ``GET /v1/info``: `routerkit.deploy.export.manifest_of` (what an ONNX bundle's manifest says
  about the run) plus the server's settings, the colours of the page and the GFLOPs of one window
  with each model alone.
- ``GET /healthz``, ``GET /metrics`` (Prometheus text, `routerkit.serve.metrics`), ``GET /`` (the page).

**Batching.** Concurrent predictions are grouped by a `DynamicBatcher` (up to ``max_batch`` inputs
or ``max_wait_ms``) and routed in one ``model.predict`` call on the stacked inputs; inputs of
another size than the trained one are routed alone (their windows batched among themselves).

**Determinism.** Serve a model loaded with fixed MC-dropout masks (``routerkit.load(run,
mask_seed=0)``, what ``routerkit serve`` does): f_0's state, hence every routing decision and
mask, is then a function of the input alone, whichever batch the request landed in. With fresh
masks per batch (``mask_seed=None``) an answer would depend on its batch's other inputs;
`create_app` warns.

**Errors.** A request that cannot be routed gets a 4xx JSON body ``{"error": {"kind", "message",
"expected"}}`` naming what was expected (content type, size limit, shape, channels...); the
server keeps serving. Error kinds are counted in ``/metrics``.
"""

import asyncio
import contextlib
import json
import tempfile
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from routerkit.deploy.inputs import IMAGE_SUFFIXES, _channels, _standardise, as_inputs, read_file
from routerkit.deploy.model import RoutedModel
from routerkit.serve.batching import BatcherClosedError, DynamicBatcher, QueueFullError
from routerkit.serve.metrics import CONTENT_TYPE, ServeMetrics
from routerkit.serve.render import FORMATS, Answer, Renderer

#: How to install what ``routerkit serve`` needs.
SERVE_EXTRA = "pip install 'routerkit[serve]'"

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"routerkit serve needs FastAPI, uvicorn and python-multipart ({err.name or err} is missing): {SERVE_EXTRA}."
    ) from None

__all__ = ["SERVE_EXTRA", "STATIC", "RequestError", "ServeSettings", "create_app"]

#: The page's files (HTML, JS, CSS), shipped inside the package.
STATIC = Path(__file__).resolve().parent / "static"
#: Content types of a raw image body, and the file suffix each is read as.
IMAGE_TYPES = {
    "image/png": ".png",
    "image/tiff": ".tif",
    "image/x-tiff": ".tif",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "application/x-npy": ".npy",
}
_PATHS = ("/", "/v1/predict", "/v1/info", "/healthz", "/metrics")
_DRAIN_BYTES = 64 * 1024 * 1024  # read and dropped past the size limit, so that the client gets the 413


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts.

    Attributes:
        max_batch: Most inputs routed together.
        max_wait_ms: Longest wait for more inputs after the first of a batch (milliseconds).
        max_bytes: Largest request body (bytes); larger ones get 413.
        max_pixels: Largest input (H x W); larger ones get 413 (an input of another size is tiled,
            and every window costs a model call).
        max_queue: Most inputs waiting for the model; beyond, requests get 503.

    Raises:
        ValueError: A setting out of range (the message names it).
    """

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_bytes: int = 20_000_000
    max_pixels: int = 4096 * 4096
    max_queue: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_bytes", "max_pixels", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Expected {name} >= 1 but got {getattr(self, name)}.")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"Expected max_wait_ms >= 0 but got {self.max_wait_ms}.")


class RequestError(Exception):
    """A request the server cannot route: answered with ``status`` and a JSON error naming what was expected.

    Args:
        status: The HTTP status (4xx, or 5xx when the server is at fault).
        kind: A short name of the error, counted in ``/metrics`` (``routerkit_errors_total{kind=...}``).
        message: What was wrong.
        expected: What the server expects instead.
    """

    def __init__(self, status: int, kind: str, message: str, expected: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.expected = expected

    def response(self) -> JSONResponse:
        """The JSON response."""
        error = {"kind": self.kind, "message": self.message, "expected": self.expected}
        return JSONResponse({"error": error, "status": self.status}, status_code=self.status)


@dataclass
class _Item:
    """One validated input on its way to the batcher."""

    x: Tensor
    uncertainty: bool


# ------------------------------------------------------------------------------ reading requests


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (what is sent past it is read and dropped, up to a cap)."""
    too_large = RequestError(
        413, "too_large", "The request body is larger than the server's limit.", f"a body of at most {limit} bytes (--max-bytes)"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _DRAIN_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()
            if size > limit + _DRAIN_BYTES:
                break
            continue
        chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _decode_file(data: bytes, suffix: str, model: RoutedModel, what: str) -> Tensor:
    """Image (or ``.npy``) bytes as a model input, read exactly as `routerkit.deploy.inputs.read_file` reads a file.

    Images are decoded from memory; a ``.npy`` body goes through a temporary file (``np.load`` of
    a file without pickles, as ``routerkit predict`` reads one).
    """
    from routerkit.data.folder import read_image_bytes

    spec = model.spec
    if suffix == ".npy":
        with tempfile.TemporaryDirectory(prefix="routerkit-serve-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                return read_file(path, spec)
            except ValueError as err:
                text = str(err).replace(f"Input file {path}", what).replace(f"file {path}", what).replace(str(path), what)
                raise RequestError(400, "undecodable", text, "a .npy array saved without pickles") from None
    try:
        pixels = read_image_bytes(data, what, spec.file_format.scale)
    except ValueError as err:
        text = str(err).replace(f"Could not read image file {what}: ", "").replace(f" {what}", "").replace(f"file {what}", what)
        raise RequestError(
            400,
            "undecodable",
            f"Could not decode {what} as a {suffix[1:].upper()} image: {text}.",
            f"a PNG, TIFF or JPEG image, 8 or 16-bit, of {spec.channels} channel(s)",
        ) from None
    try:
        pixels = _channels(pixels, spec, what)
    except ValueError as err:
        raise RequestError(400, "channels", str(err), f"{spec.channels} channel(s)") from None
    return _standardise(pixels, spec)


def _decode_json(body: bytes, model: RoutedModel) -> Tensor:
    """``{"input": nested array}`` (model space) as one model input."""
    spec = model.spec
    shape = ", ".join(map(str, spec.input_shape))
    expected = f'{{"input": nested array [{shape}]}} in model space (other H, W are tiled)'
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, "json", f"The body is not valid JSON ({err}).", expected) from None
    if not isinstance(doc, dict) or "input" not in doc:
        got = f"an object with keys {sorted(doc)}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise RequestError(400, "json", f'Expected a JSON object with an "input" key but got {got}.', expected)
    try:
        array = np.asarray(doc["input"], dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise RequestError(400, "shape", f'"input" is not a rectangular array of numbers ({err}).', expected) from None
    rank = len(spec.input_shape)
    if array.ndim == rank + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (rank, rank - 1) or (array.ndim == rank - 1 and (rank != 3 or spec.channels != 1)):
        raise RequestError(400, "shape", f'"input" has shape {list(array.shape)}: one input per request.', expected)
    if array.size == 0:
        raise RequestError(400, "shape", f'"input" is empty (shape {list(array.shape)}).', expected)
    if not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise RequestError(400, "values", f'"input" holds {count} NaN or infinite value(s).', "finite numbers")
    return as_inputs(torch.from_numpy(array), spec)[0].tensor


async def _multipart_file(request: Request, body: bytes) -> tuple[bytes, str | None, str]:
    """The ``file`` field of a multipart/form-data body: its bytes, its content type and its file name."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    expected = "multipart/form-data with one image in a field named 'file'"
    try:
        form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
    except MultiPartException as err:
        raise RequestError(400, "content_type", f"Could not parse the multipart body: {err.message}.", expected) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            fields = sorted(form.keys())
            raise RequestError(400, "content_type", f"No file field named 'file' in the form (fields: {fields}).", expected)
        data = await upload.read()
        return data, upload.content_type, upload.filename or "file"
    finally:
        await form.close()


def _check_input(x: Tensor, model: RoutedModel, settings: ServeSettings, what: str) -> None:
    spec = model.spec
    shape = list(spec.input_shape)
    if not spec.spatial and tuple(x.shape) != spec.input_shape:
        raise RequestError(
            400,
            "shape",
            f"{what} has shape {list(x.shape)}; a classification run takes its trained shape only.",
            f"shape {shape}",
        )
    if spec.spatial:
        if x.dim() != len(shape):
            raise RequestError(400, "shape", f"{what} has shape {list(x.shape)}.", f"an input [C, H, W] with C = {shape[0]}")
        if x.shape[0] != shape[0]:
            raise RequestError(
                400, "channels", f"{what} has {x.shape[0]} channel(s) (shape {list(x.shape)}).", f"{shape[0]} channel(s)"
            )
        pixels = int(x.shape[-1]) * int(x.shape[-2])
        if pixels > settings.max_pixels:
            raise RequestError(
                413,
                "too_large",
                f"{what} is {x.shape[-2]} x {x.shape[-1]} = {pixels} pixels.",
                f"at most {settings.max_pixels} pixels (--max-pixels)",
            )
    if not bool(torch.isfinite(x).all()):
        raise RequestError(400, "values", f"{what} holds NaN or infinite values.", "finite values")


async def _read_input(request: Request, model: RoutedModel, settings: ServeSettings) -> tuple[Tensor, str]:
    """The request's input as a model-space tensor and its name."""
    media = _media_type(request)
    accepted = ", ".join([*IMAGE_TYPES, "multipart/form-data (field 'file')", "application/json ({'input': nested array})"])
    if media not in IMAGE_TYPES and media not in ("multipart/form-data", "application/json"):
        got = f"content type {media!r}" if media else "no content type"
        raise RequestError(415, "content_type", f"Cannot read a body with {got}.", f"one of: {accepted}")
    body = await _read_body(request, settings.max_bytes)
    if not body:
        raise RequestError(400, "empty", "The request body is empty.", f"an input as one of: {accepted}")
    if media == "application/json":
        x = await asyncio.to_thread(_decode_json, body, model)
        name = "input"
    else:
        if media == "multipart/form-data":
            body, part_type, name = await _multipart_file(request, body)
            if not body:
                raise RequestError(400, "empty", f"The uploaded file {name!r} is empty.", "an image file")
            part = (part_type or "").split(";")[0].strip().lower()
            suffix = IMAGE_TYPES.get(part) or next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), None)
            if suffix is None:
                raise RequestError(
                    415,
                    "content_type",
                    f"The uploaded file {name!r} has content type {part_type!r} and no known image suffix.",
                    f"an image file ({', '.join(IMAGE_SUFFIXES)}) or one of the content types {', '.join(IMAGE_TYPES)}",
                )
        else:
            suffix, name = IMAGE_TYPES[media], "input"
        x = await asyncio.to_thread(_decode_file, body, suffix, model, f"the uploaded image {name!r}")
    _check_input(x, model, settings, f"The input {name!r}")
    return x, name


# ------------------------------------------------------------------------------ the app


def create_app(
    model: RoutedModel,
    settings: ServeSettings | None = None,
    source: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
) -> FastAPI:
    """A FastAPI app that routes requests with ``model`` (see the module's docstring for the endpoints).

    The batch worker starts with the app's lifespan (``uvicorn`` runs it; use ``with
    TestClient(app) as client:`` in tests) or with the first prediction.

    Args:
        model: The routed model, best loaded with fixed MC-dropout masks (``routerkit.load(run, mask_seed=0)``).
        settings: Batching and limits (default `ServeSettings`).
        source: Where the model came from (``run_dir``, ``checkpoint``), shown in ``/v1/info``.
        backend: What serves it, shown in ``/v1/info`` as ``backend`` (default ``{"name": "local"}``;
            `routerkit.serve.ray_backend` gives its deployments).

    Returns:
        The app; ``app.state`` holds ``model``, ``settings``, ``metrics`` (`ServeMetrics`),
        ``batcher`` (`DynamicBatcher`) and ``renderer`` (`routerkit.serve.render.Renderer`).

    Example:
        >>> import routerkit  # doctest: +SKIP
        >>> from fastapi.testclient import TestClient  # doctest: +SKIP
        >>> app = create_app(routerkit.load("runs/battery", mask_seed=0))  # doctest: +SKIP
        >>> with TestClient(app) as client:  # doctest: +SKIP
        ...     client.get("/v1/info").json()["model_names"]
    """
    from routerkit.deploy.export import manifest_of

    settings = settings or ServeSettings()
    info = manifest_of(model, source)
    if info["state"]["masks"] == "per batch":
        warnings.warn(
            "Serving a model whose MC-dropout masks are drawn afresh per batch: an answer then depends on the other "
            "inputs of its batch. Load it with routerkit.load(run, mask_seed=0) for answers that depend on the input alone.",
            stacklevel=2,
        )
    renderer = Renderer(model)
    metrics = ServeMetrics(model.model_names)
    trained = tuple(model.spec.input_shape)

    def run_batch(items: list[_Item]) -> list[Answer]:
        want = any(item.uncertainty for item in items)
        if len(items) == 1:
            out = model.predict(items[0].x, batch_size=settings.max_batch, uncertainty=want)
        else:
            out = model.predict(torch.stack([item.x for item in items]), batch_size=len(items), uncertainty=want)
        return [Answer(out, i, len(items)) for i in range(len(items))]

    batcher: DynamicBatcher[_Item, Answer] = DynamicBatcher(
        run_batch,
        settings.max_batch,
        settings.max_wait_ms,
        batchable=lambda item: tuple(item.x.shape) == trained,
        on_batch=metrics.batch,
        max_queue=settings.max_queue,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="routerkit",
        version=str(info["routerkit_version"]),
        summary="Route every input, or every patch of an input, to the right model of a zoo.",
        lifespan=lifespan,
    )
    app.state.model = model
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.renderer = renderer
    served_info = {
        **info,
        "model_names": model.model_names,
        "num_units": model.pipeline.partitioner.num_units,
        "grid": list(model.pipeline.partitioner.grid_shape),
        "window_gflops": dict(zip(model.model_names, renderer.window_gflops, strict=True)),
        "largest_model": model.model_names[renderer.largest],
        "model_colours": renderer.model_colours,
        "class_colours": renderer.class_colours,
        "backend": backend or {"name": "local"},
        "serve": {
            **asdict(settings),
            "formats": list(FORMATS),
            "content_types": [*IMAGE_TYPES, "multipart/form-data", "application/json"],
        },
    }

    def error_response(err: RequestError) -> JSONResponse:
        metrics.error(err.kind)
        return err.response()

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        path = request.url.path
        endpoint = path if path in _PATHS else "/static" if path.startswith("/static/") else "other"
        metrics.request(endpoint, response.status_code)
        return response

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http")
        expected = f"one of {', '.join(_PATHS)} (GET; POST for /v1/predict)" if kind != "http" else None
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(RequestError(err.status_code, kind, message, expected))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(RequestError(400, "validation", f"Invalid request: {err.errors()}"))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the models and the inputs waiting."""
        return {"status": "ok", "models": model.model_names, "queue": batcher.pending}

    @app.get("/v1/info")
    async def v1_info() -> dict[str, Any]:
        """What the run is (manifest fields of `routerkit.deploy.export.manifest_of`) and how it is served."""
        return served_info

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Counters and histograms in the Prometheus text format."""
        metrics.set_queue_depth(batcher.pending)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/predict")
    async def v1_predict(request: Request, format: str = "json") -> JSONResponse:
        """Route one input (raw image body, multipart ``file`` field, or JSON ``{"input": ...}``)."""
        start = time.perf_counter()
        if format not in FORMATS:
            raise RequestError(400, "format", f"Unknown format {format!r}.", f"format one of {', '.join(FORMATS)}")
        if format == "png" and not model.spec.spatial:
            raise RequestError(400, "format", "format=png returns a mask: a classification run has none.", "format json or page")
        x, name = await _read_input(request, model, settings)
        try:
            result = await batcher.submit(_Item(x, uncertainty=format == "page"))
        except QueueFullError as err:
            raise RequestError(503, "overloaded", str(err), "fewer concurrent requests") from None
        except BatcherClosedError as err:
            raise RequestError(503, "unavailable", str(err), "a running server") from None
        except (ValueError, TypeError) as err:  # the model refused an input the checks let through
            raise RequestError(400, "shape", str(err), f"an input that fits the run ({list(model.spec.input_shape)})") from None
        except Exception as err:
            raise RequestError(500, "internal", f"Routing failed: {type(err).__name__}: {err}") from None
        if format == "page":
            body = await asyncio.to_thread(renderer.answer, result, name, format, x)
        else:
            body = renderer.answer(result, name, format, x)
        latency = time.perf_counter() - start
        body["latency_ms"] = 1000.0 * latency
        actions = result.prediction.actions[result.index]
        units = torch.bincount(actions.flatten(), minlength=len(model.model_names)).tolist()
        metrics.served(units, body["gflops"], body["gflops_largest"], latency, body["windows"])
        return JSONResponse(body)

    return app
