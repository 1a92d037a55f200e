"""Serve a trained run over HTTP in one process: ``routerkit serve RUN`` or `create_app` + uvicorn.

Needs the ``serve`` extra (``pip install 'routerkit[serve]'``: FastAPI, uvicorn, python-multipart);
importing this package without it raises an ``ImportError`` that says so.

Example:
    >>> import routerkit  # doctest: +SKIP
    >>> from routerkit.serve import ServeSettings, create_app, run_server  # doctest: +SKIP
    >>> model = routerkit.load("runs/battery", mask_seed=0)  # doctest: +SKIP
    >>> run_server(create_app(model, ServeSettings(max_batch=16)), port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from routerkit.serve.app import SERVE_EXTRA, RequestError, ServeSettings, create_app
from routerkit.serve.batching import BatcherClosedError, DynamicBatcher, QueueFullError
from routerkit.serve.metrics import ServeMetrics

__all__ = [
    "SERVE_EXTRA",
    "BatcherClosedError",
    "DynamicBatcher",
    "QueueFullError",
    "RequestError",
    "ServeMetrics",
    "ServeSettings",
    "create_app",
    "run_server",
]


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn in this process until interrupted (Ctrl-C).

    Args:
        app: The app (`create_app`).
        host: Address to listen on (``0.0.0.0``: every interface).
        port: TCP port.
        log_level: uvicorn's log level.

    Raises:
        ImportError: uvicorn is not installed (the ``serve`` extra).
    """
    try:
        import uvicorn
    except ImportError:
        raise ImportError(f"routerkit serve needs uvicorn: {SERVE_EXTRA}.") from None
    uvicorn.run(app, host=host, port=port, log_level=log_level)
