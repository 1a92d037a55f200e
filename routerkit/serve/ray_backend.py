"""``routerkit serve RUN --backend ray``: the same HTTP API as a Ray Serve application, each costlier model scaled on its own.

The application has one **ingress** deployment and one deployment per costlier model:

- ``RoutedIngress`` serves the FastAPI app of `routerkit.serve.app.create_app` (every endpoint, the
  page, dynamic batching of requests, errors, metrics). It runs ``f_0``, its MC-dropout state and
  the router, where the data arrive (the paper's edge).
- ``ModelReplica`` (one deployment per ``f_1..f_m``, named after the model) holds that model
  alone, with its own replicas or autoscaling, ``num_cpus`` / ``num_gpus``, and ``@serve.batch``
  batching of the calls it gets (the paper's fog and cloud). In the ingress's pipeline the model
  is replaced by a `RemoteModel`, which sends the units routed to it to that deployment, so the
  routing code, the FLOP accounting and the answers are those of the one-process server.

Settings come from `routerkit.config.schema.ServeConfig` (``serve:`` in a config file; the
``ray`` part is `RayServeConfig`). f_0's MC-dropout masks are fixed (``mask_seed``) in the ingress,
and every replica loads the same inference copy of its model as ``routerkit.load`` makes (batch
norms folded), so the Ray backend answers as the one-process backend does.

Needs the ``ray`` extra (``pip install 'routerkit[ray]'``: ``ray[serve]``); importing this module
without it raises an ``ImportError`` that says so.

Example:
    >>> from routerkit.config.schema import ServeConfig  # doctest: +SKIP
    >>> start_ray_server("runs/battery", ServeConfig(backend="ray"), blocking=True)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from routerkit.config.schema import RayDeploymentConfig, RayModelConfig, ServeConfig

#: Seconds Serve's HTTP proxy of a local cluster gets to start (Ray's default, 5 s, is too short on a busy small machine).
PROXY_READY_TIMEOUT_S = 60
#: How to install what ``--backend ray`` needs.
RAY_EXTRA = "pip install 'routerkit[ray]'"

try:
    import ray
    from ray import serve
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"routerkit serve --backend ray needs Ray Serve ({err.name or err} is missing): {RAY_EXTRA}.") from None

__all__ = [
    "RAY_EXTRA",
    "ModelReplica",
    "RemoteModel",
    "RoutedIngress",
    "build_ray_app",
    "check_resources",
    "deployment_options",
    "model_settings",
    "start_ray_server",
]


def _threads(num_cpus: float) -> int:
    return max(1, round(num_cpus))


def deployment_options(cfg: RayDeploymentConfig) -> dict[str, Any]:
    """Keyword arguments of ``Deployment.options`` for ``cfg``: replicas or autoscaling, resources, concurrency."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def model_settings(cfg: ServeConfig, name: str) -> RayModelConfig:
    """The deployment settings of costlier model ``name``: ``serve.ray.models[name]``, else ``serve.ray.model_defaults``."""
    return cfg.ray.models.get(name, cfg.ray.model_defaults)


class RemoteModel(nn.Module):
    """Stands in for a costlier model in the ingress: its forward runs on the model's Ray Serve deployment.

    Units are sent in calls of at most ``units_per_call`` (all at once, so that the deployment's
    replicas share them) and the logits come back in order, on the units' device.

    Args:
        handle: The deployment's handle.
        name: The model's name (for errors).
        units_per_call: Most units per call (``None``: one call).
        timeout_s: Longest wait for an answer.
    """

    def __init__(self, handle: Any, name: str, units_per_call: int | None = None, timeout_s: float = 120.0) -> None:
        super().__init__()
        self.handle, self.name, self.units_per_call, self.timeout_s = handle, name, units_per_call, timeout_s
        #: Calls sent and units they carried (`RoutedIngress.remote_calls`).
        self.calls = 0
        self.units = 0

    def submit(self, units: Tensor) -> Callable[[], Tensor]:
        """Send the units now; the returned callable waits for their logits (`routerkit.executor.Executor.run`
        submits every remote model's units before it waits for any)."""
        chunks = units.split(self.units_per_call) if self.units_per_call else (units,)
        try:
            # each chunk cloned: a view would be pickled with its whole base buffer; all sent before any is awaited
            responses = [self.handle.remote(chunk.detach().cpu().clone()) for chunk in chunks]
        except Exception as err:
            raise RuntimeError(f"model deployment {self.name!r} failed: {type(err).__name__}: {err}") from err
        self.calls += len(chunks)
        self.units += int(units.shape[0])

        def result() -> Tensor:
            try:
                outs = [response.result(timeout_s=self.timeout_s) for response in responses]
            except Exception as err:
                raise RuntimeError(f"model deployment {self.name!r} failed: {type(err).__name__}: {err}") from err
            return torch.cat(outs).to(units.device)

        return result

    def forward(self, units: Tensor) -> Tensor:
        return self.submit(units)()


def _load(run_dir: str, checkpoint: str | None, mask_seed: int, trust: bool, device: str = "cpu") -> Any:
    from routerkit.deploy import load

    return load(run_dir, checkpoint, trust_remote_code=trust, mask_seed=mask_seed, device=device)


class ModelReplica:
    """One replica of costlier model ``index``: its inference copy, fed by ``@serve.batch``.

    Args:
        run_dir: The run directory (read on the replica's node).
        checkpoint: Checkpoint name (``None``: the final one).
        index: The model's zoo index (``>= 1``).
        mask_seed: As the ingress (the model itself has no MC state; kept for the same load).
        trust: Import plugin code the run names (``--trust-remote-code``).
        settings: The deployment's `RayModelConfig` as a dict (``max_batch``, ``batch_wait_ms``, ``num_cpus``, ``num_gpus``).
    """

    def __init__(
        self, run_dir: str, checkpoint: str | None, index: int, mask_seed: int, trust: bool, settings: dict[str, Any]
    ) -> None:
        cfg = RayModelConfig(**settings)
        torch.set_num_threads(_threads(cfg.num_cpus))
        routed = _load(run_dir, checkpoint, mask_seed, trust)
        if not 1 <= index < len(routed.model_names):
            raise ValueError(f"Expected a costlier model index in 1..{len(routed.model_names) - 1} but got {index}.")
        self.name = routed.model_names[index]
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.model = routed.zoo[index].to(self.device).eval()
        self.calls = 0
        self.batches = 0
        self.forward.set_max_batch_size(cfg.max_batch)  # type: ignore[attr-defined]  # serve.batch's setters
        self.forward.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000.0)  # type: ignore[attr-defined]

    def _run(self, groups: list[Tensor]) -> list[Tensor]:
        sizes = [int(g.shape[0]) for g in groups]
        with torch.inference_mode():
            out = self.model(torch.cat(groups).to(self.device)).float().cpu()
        return [part.clone() for part in out.split(sizes)]  # a view would be pickled with the whole batch's logits

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def forward(self, groups: list[Tensor]) -> list[Tensor]:
        """Logits of every group of units, in one forward of their concatenation (in a thread: the loop keeps batching)."""
        outs = await asyncio.to_thread(self._run, groups)
        self.calls += len(groups)
        self.batches += 1
        return outs

    async def __call__(self, units: Tensor) -> Tensor:
        result: Tensor = await self.forward(units)
        return result

    def stats(self) -> dict[str, Any]:
        """Calls and batches this replica served, and where its model runs."""
        return {"model": self.name, "calls": self.calls, "batches": self.batches, "device": str(self.device)}


@serve.ingress()
class RoutedIngress:
    """The ingress: `create_app` on ``routerkit.load(run)``, with the costlier models served by their deployments.

    Args:
        run_dir: The run directory.
        checkpoint: Checkpoint name (``None``: the final one).
        serve_cfg: The `ServeConfig` as a dict.
        trust: Import plugin code the run names.
        *handles: The handles of ``f_1..f_m``'s deployments, in zoo order.
    """

    def __init__(self, run_dir: str, checkpoint: str | None, serve_cfg: dict[str, Any], trust: bool, *handles: Any) -> None:
        from routerkit.serve.app import ServeSettings, create_app

        cfg = ServeConfig(**serve_cfg)
        torch.set_num_threads(_threads(cfg.ray.ingress.num_cpus))
        device = "cuda" if cfg.ray.ingress.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        model = _load(run_dir, checkpoint, cfg.mask_seed, trust, device)
        self._remote: list[RemoteModel] = []
        names = model.model_names
        if len(handles) != len(names) - 1:
            raise ValueError(f"Expected one deployment handle per costlier model ({len(names) - 1}) but got {len(handles)}.")
        settings = ServeSettings(cfg.max_batch, cfg.max_wait_ms, cfg.max_bytes, cfg.max_pixels, cfg.max_queue)
        deployments = {
            "ingress": {"models": [names[0]], **cfg.ray.ingress.model_dump()},
            **{names[i]: model_settings(cfg, names[i]).model_dump() for i in range(1, len(names))},
        }
        backend = {"name": "ray", "app_name": cfg.ray.app_name, "deployments": deployments}
        source = {"run_dir": run_dir, "checkpoint": checkpoint}
        self._routed_app = create_app(model, settings, source, backend=backend)  # `app` is Ray's property
        for i, handle in enumerate(handles, start=1):
            remote = RemoteModel(handle, names[i], model_settings(cfg, names[i]).units_per_call)
            model.zoo.members[i] = remote
            self._remote.append(remote)

    def remote_calls(self) -> dict[str, dict[str, int]]:
        """Per costlier model, the calls this replica sent to its deployment and the units they carried."""
        return {r.name: {"calls": r.calls, "units": r.units} for r in self._remote}

    def __serve_build_asgi_app__(self) -> Any:
        return self._routed_app


def build_ray_app(run_dir: str | Path, cfg: ServeConfig, checkpoint: str | None = None, trust_remote_code: bool = False) -> Any:
    """The Ray Serve application of a run: ``RoutedIngress`` bound to one ``ModelReplica`` deployment per costlier model.

    The run is read once here (config, data spec, checkpoint) so that a bad run fails before
    anything is deployed; every replica loads it again.

    Args:
        run_dir: The run directory (a path every Ray node can read).
        cfg: The serve settings (``cfg.ray``: the deployments).
        checkpoint: Checkpoint name (``None``: the final one).
        trust_remote_code: Import plugin code the run names.

    Returns:
        The application, for ``serve.run``.

    Raises:
        ConfigError: Not a run directory, an untrusted run, a model name in ``cfg.ray.models``
            that is not a costlier model of the run.
    """
    return _build(run_dir, cfg, checkpoint, trust_remote_code)[0]


def _build(run_dir: str | Path, cfg: ServeConfig, checkpoint: str | None, trust_remote_code: bool) -> tuple[Any, list[str]]:
    from routerkit.config import ConfigError
    from routerkit.training.run_dir import load_routing

    path = str(Path(run_dir).resolve())
    names = list(load_routing(path, checkpoint, trust_remote_code, "cpu").zoo.names)
    unknown = sorted(set(cfg.ray.models) - set(names[1:]))
    if unknown:
        raise ConfigError(
            f"serve.ray.models.{unknown[0]}: expected the name of a costlier model of {path} ({', '.join(names[1:])}) "
            f"but got {unknown[0]!r}."
        )
    handles = []
    for i in range(1, len(names)):
        settings = model_settings(cfg, names[i])
        deployment = serve.deployment(name=names[i], **deployment_options(settings))(ModelReplica)
        # the trust check ran above, in this process; a replica on another node has no record of it
        handles.append(deployment.bind(path, checkpoint, i, cfg.mask_seed, True, settings.model_dump()))
    ingress_options = deployment_options(cfg.ray.ingress)
    ingress_options["max_queued_requests"] = cfg.max_queue  # beyond: Ray's proxy answers 503, as the one-process server
    ingress = serve.deployment(name="ingress", **ingress_options)(RoutedIngress)
    return ingress.bind(path, checkpoint, cfg.model_dump(), True, *handles), names


def _replicas_at_start(cfg: RayDeploymentConfig) -> int:
    return max(cfg.autoscaling.min_replicas, 1) if cfg.autoscaling is not None else cfg.num_replicas


def check_resources(cfg: ServeConfig, names: list[str], available: dict[str, float]) -> None:
    """Refuse deployments whose starting replicas need more CPUs or GPUs than the cluster has (Ray would wait forever).

    Args:
        cfg: The serve settings.
        names: The zoo's model names (``f_0`` first).
        available: ``ray.cluster_resources()``.

    Raises:
        ConfigError: The settings ask for more than ``available``; the message names the fields and the totals.
    """
    from routerkit.config import ConfigError

    parts = [("serve.ray.ingress", cfg.ray.ingress)]
    parts += [
        (f"serve.ray.models.{n}" if n in cfg.ray.models else "serve.ray.model_defaults", model_settings(cfg, n))
        for n in names[1:]
    ]
    labels = ["ingress", *names[1:]]
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = [
            (field, label, _replicas_at_start(d), float(getattr(d, key))) for (field, d), label in zip(parts, labels, strict=True)
        ]
        total = sum(r * each for _, _, r, each in need)
        have = float(available.get(resource, 0.0))
        if total > have + 1e-9:
            listed = ", ".join(f"{label} {r} x {each:g}" for _, label, r, each in need if each > 0)
            fields = sorted({f"{field}.{key}" for field, _, _, each in need if each > 0})
            raise ConfigError(
                f"{', '.join(fields)}: the deployments' starting replicas need {total:g} {resource}s ({listed}) but the Ray "
                f"cluster has {have:g}; lower them, or add {resource}s to the cluster (serve.ray.num_cpus for a local one)."
            )


def start_ray_server(
    run_dir: str | Path,
    cfg: ServeConfig,
    checkpoint: str | None = None,
    trust_remote_code: bool = False,
    blocking: bool = False,
    on_ready: Callable[[list[str]], None] | None = None,
) -> Any:
    """Join (``cfg.ray.address``) or start a Ray cluster, start Serve's HTTP proxy on ``cfg.host:cfg.port``, deploy the run.

    Args:
        run_dir: The run directory.
        cfg: The serve settings.
        checkpoint: Checkpoint name.
        trust_remote_code: Import plugin code the run names.
        blocking: Serve until interrupted (Ctrl-C), then delete the application.
        on_ready: Called with the zoo's model names once the application is running.

    Returns:
        The ingress's handle (``None`` when blocking).

    Raises:
        ConfigError: What `build_ray_app` raises.
    """
    app, names = _build(run_dir, cfg, checkpoint, trust_remote_code)
    if not ray.is_initialized():
        # Serve's HTTP proxy must report ready within 5 s by default, which a busy 2-core machine misses while it
        # imports; a local cluster's actors inherit this process's environment.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_TIMEOUT_S))
        local = cfg.ray.address is None
        ray.init(
            address="local" if local else cfg.ray.address,  # "local": a new cluster, even where RAY_ADDRESS is set
            num_cpus=cfg.ray.num_cpus if local else None,
            include_dashboard=False,
            log_to_driver=True,  # a replica that fails to start says why
        )
    check_resources(cfg, names, ray.cluster_resources())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(app, name=cfg.ray.app_name, route_prefix="/")
    if on_ready is not None:
        on_ready(names)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(cfg.ray.app_name)
    return None
