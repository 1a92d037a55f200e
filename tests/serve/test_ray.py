"""`routerkit serve --backend ray`: the same API on Ray Serve, each costlier model a deployment of its own.

The cluster test (marker ``ray``) starts a local Ray cluster of 2 CPUs, deploys the tiny calibrated battery run with two
replicas of the largest model and its units cut into calls of 5, and checks that every answer (actions, mask, GFLOPs)
is the one-process backend's; `.ci/run` runs it with a time bound (``pytest -m ray``). The other tests need Ray
installed but no cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("ray.serve", reason="routerkit serve --backend ray needs the ray extra: pip install 'routerkit[ray]'")

from routerkit.cli import app
from routerkit.config import ConfigError
from routerkit.config.schema import RayAutoscalingConfig, RayModelConfig, ServeConfig
from routerkit.deploy import RoutedModel
from routerkit.serve.ray_backend import RemoteModel, build_ray_app, deployment_options, model_settings
from serve.conftest import CHECKPOINT, free_socket


class _Response:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def result(self, timeout_s: float | None = None) -> torch.Tensor:
        return self.value


class _Handle:
    """Stands in for a deployment handle: runs ``model`` on each call, and records the calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls = model, []  # type: ignore[var-annotated]

    def remote(self, units: torch.Tensor) -> _Response:
        self.calls.append(int(units.shape[0]))
        return _Response(self.model(units))


def test_remote_model_cuts_units_into_calls_and_keeps_their_order() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 3, 3, padding=1)
    handle = _Handle(model)
    units = torch.randn(12, 1, 8, 8)
    out = RemoteModel(handle, "f2", units_per_call=5)(units)
    assert handle.calls == [5, 5, 2]
    assert torch.allclose(out, model(units))
    assert RemoteModel(_Handle(model), "f2")(units).shape == (12, 3, 8, 8)


def test_the_executor_sends_every_remote_model_its_units_before_waiting_for_any() -> None:
    from routerkit.executor import Executor
    from routerkit.models import Zoo
    from routerkit.partitioners import WholeInput

    events: list[str] = []

    class Logged(_Handle):
        def __init__(self, model: torch.nn.Module, name: str) -> None:
            super().__init__(model)
            self.name = name

        def remote(self, units: torch.Tensor) -> _Response:
            events.append(f"send {self.name}")
            outer = self

            class Late(_Response):
                def result(self, timeout_s: float | None = None) -> torch.Tensor:
                    events.append(f"wait {outer.name}")
                    return self.value

            return Late(self.model(units))

    torch.manual_seed(0)
    nn = torch.nn
    local = [nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()) for _ in range(3)]
    zoo = Zoo([local[0], RemoteModel(Logged(local[1], "f1"), "f1"), RemoteModel(Logged(local[2], "f2"), "f2")])
    units = torch.randn(6, 1, 8, 8)
    actions = torch.tensor([[1], [2], [1], [2], [2], [1]])
    out = Executor(zoo, WholeInput()).run(units, actions, None)
    assert events == ["send f1", "send f2", "wait f1", "wait f2"]
    expected = torch.stack([torch.softmax(local[int(a)](units[i : i + 1]), 1)[0] for i, a in enumerate(actions.flatten())])
    assert torch.allclose(out.unit_probs, expected, atol=1e-6)


def test_a_failing_deployment_is_named() -> None:
    class Broken:
        def remote(self, units: torch.Tensor) -> Any:
            raise RuntimeError("replica died")

    with pytest.raises(RuntimeError, match="model deployment 'f2_large' failed: RuntimeError: replica died"):
        RemoteModel(Broken(), "f2_large")(torch.zeros(2, 1, 4, 4))


def test_deployment_options_map_replicas_autoscaling_and_resources() -> None:
    fixed = deployment_options(RayModelConfig(num_replicas=3, num_cpus=2, num_gpus=0.5, max_ongoing_requests=4))
    assert fixed == {"ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.5}, "max_ongoing_requests": 4, "num_replicas": 3}
    scaled = deployment_options(RayModelConfig(autoscaling=RayAutoscalingConfig(min_replicas=0, max_replicas=6)))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 2.0,
    }
    cfg = ServeConfig(ray={"models": {"f2_large": {"num_replicas": 2}}, "model_defaults": {"num_cpus": 0.25}})
    assert model_settings(cfg, "f2_large").num_replicas == 2 and model_settings(cfg, "f1_medium").num_cpus == 0.25


def test_deployments_that_cannot_fit_the_cluster_are_refused_naming_the_fields() -> None:
    from routerkit.serve.ray_backend import check_resources

    names = ["f0_small", "f1_medium", "f2_large"]
    fits = ServeConfig(ray={"models": {"f2_large": {"num_replicas": 2}}})  # 0.5 + 0.5 + 2 x 0.5 CPUs
    check_resources(fits, names, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"serve\.ray\.models\.f2_large\.num_gpus: .* need 1 GPUs .* has 0"):
        check_resources(ServeConfig(ray={"models": {"f2_large": {"num_gpus": 1}}}), names, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"need 2\.5 CPUs \(ingress 1 x 0\.5, f1_medium 1 x 0\.5, f2_large 3 x 0\.5\)"):
        check_resources(ServeConfig(ray={"models": {"f2_large": {"num_replicas": 3}}}), names, {"CPU": 2.0})


def test_a_model_name_the_run_does_not_have_is_refused_before_deploying(serve_run: Path) -> None:
    cfg = ServeConfig(ray={"models": {"f9_huge": {}}})
    with pytest.raises(ConfigError, match=r"serve\.ray\.models\.f9_huge: expected the name of a costlier model"):
        build_ray_app(serve_run, cfg, CHECKPOINT)


def test_bad_serve_settings_are_named_before_anything_starts(serve_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["serve", str(serve_run), "--backend", "ray", "-s", "ray.models.f2_large.num_replicas=0"])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and "serve.ray.models.f2_large.num_replicas" in said
    bad = tmp_path / "serve.yaml"
    bad.write_text("serve:\n  backend: kubernetes\n")
    result = runner.invoke(app, ["serve", str(serve_run), "--config", str(bad)])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and "serve.backend" in said and "'local' or 'ray'" in said
    bad.write_text("ray: {}\n")
    result = runner.invoke(app, ["serve", str(serve_run), "--config", str(bad)])
    assert result.exit_code != 0 and "a 'serve:' section" in " ".join(result.output.split())


# ------------------------------------------------------------------------------ a local Ray cluster


@pytest.fixture(scope="module")
def ray_server(serve_run: Path) -> Iterator[str]:
    import ray
    from ray import serve

    from routerkit.serve.ray_backend import start_ray_server

    with free_socket() as sock:
        port = sock.getsockname()[1]
    cfg = ServeConfig(
        backend="ray",
        port=port,
        max_batch=8,
        max_wait_ms=25.0,
        max_bytes=50_000,
        max_pixels=80 * 80,
        ray={
            "num_cpus": 2,
            "app_name": "routerkit-test",
            "models": {"f2_large": {"num_replicas": 2, "units_per_call": 5, "max_batch": 4}},
        },
    )
    started: list[list[str]] = []
    start_ray_server(serve_run, cfg, CHECKPOINT, on_ready=started.append)
    assert started == [["f0_small", "f1_medium", "f2_large"]]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _png(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.ray
def test_ray_answers_as_the_one_process_backend(
    ray_server: str, reference_model: RoutedModel, scans: dict[str, list[Path]]
) -> None:
    import httpx
    from fastapi.testclient import TestClient

    from routerkit.serve import ServeSettings, create_app

    local = create_app(reference_model, ServeSettings(max_batch=8, max_wait_ms=25.0, max_bytes=50_000, max_pixels=80 * 80))
    rng = np.random.default_rng(3)
    inputs = [{"input": rng.random((1, 32, 32)).tolist()} for _ in range(4)]
    files = scans["trained"][:4] + scans["tiled"][:2]
    from ray import serve

    ingress = serve.get_deployment_handle("ingress", app_name="routerkit-test")
    before = ingress.remote_calls.remote().result(timeout_s=60)
    routed = {"f1_medium": 0, "f2_large": 0}
    with TestClient(local) as client, httpx.Client(base_url=ray_server, timeout=120) as remote:
        routed_past_f0 = 0
        for body in inputs:
            a, b = client.post("/v1/predict", json=body).json(), remote.post("/v1/predict", json=body).json()
            assert b["actions"] == a["actions"] and b["mask"] == a["mask"]
            assert b["gflops"] == pytest.approx(a["gflops"]) and b["gflops_largest"] == pytest.approx(a["gflops_largest"])
            routed_past_f0 += sum(x > 0 for x in a["actions"])
            for name in routed:
                routed[name] += a["action_names"].count(name)
        for path in files:
            headers = {"content-type": "image/png"}
            a = client.post("/v1/predict", content=_png(path), headers=headers).json()
            b = remote.post("/v1/predict", content=_png(path), headers=headers).json()
            assert b["actions"] == a["actions"] and b["mask"] == a["mask"] and b["windows"] == a["windows"]
            routed_past_f0 += sum(x > 0 for x in a["actions"])
            for name in routed:
                routed[name] += a["action_names"].count(name)
        assert routed_past_f0 > 0, "the comparison must cover units the costlier deployments answered"
    after = ingress.remote_calls.remote().result(timeout_s=60)
    for name, units in routed.items():  # every unit routed past f_0 went to its model's deployment, none ran in the ingress
        assert after[name]["units"] - before[name]["units"] == units, name
    f2_calls, f2_units = (after["f2_large"][k] - before["f2_large"][k] for k in ("calls", "units"))
    assert f2_units == 0 or f2_calls >= -(-f2_units // 5)  # units_per_call 5: larger groups were cut


@pytest.mark.ray
def test_ray_serves_every_endpoint_and_refuses_bad_requests(ray_server: str, scans: dict[str, list[Path]]) -> None:
    import httpx

    from serve.test_app import _bad_cases

    with httpx.Client(base_url=ray_server, timeout=120) as remote:
        assert remote.get("/healthz").json()["status"] == "ok"
        info = remote.get("/v1/info").json()
        deployments = info["backend"]["deployments"]
        assert info["backend"]["name"] == "ray" and deployments["f2_large"]["num_replicas"] == 2
        assert deployments["ingress"]["models"] == ["f0_small"] and deployments["f2_large"]["units_per_call"] == 5
        assert "<html" in remote.get("/").text.lower()
        cases = _bad_cases(scans["trained"][0])
        for name, kwargs, status, kind, expected in cases:  # the one-process server's bad requests, through Ray's proxy
            response = remote.post("/v1/predict", **kwargs)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["kind"] == kind and expected in f"{error['message']} {error['expected']}", (name, error)
            good = remote.post("/v1/predict", content=scans["trained"][1].read_bytes(), headers={"content-type": "image/png"})
            assert good.status_code == 200, (name, good.text)  # still serving
        metrics = remote.get("/metrics").text
        assert 'routerkit_errors_total{kind="undecodable"}' in metrics


@pytest.mark.ray
def test_each_costlier_model_runs_in_its_own_deployment(ray_server: str) -> None:
    from ray import serve

    stats = serve.get_deployment_handle("f2_large", app_name="routerkit-test").stats.remote().result(timeout_s=60)
    assert stats["model"] == "f2_large" and stats["device"] == "cpu" and stats["batches"] <= stats["calls"]
    status = serve.status().applications["routerkit-test"]
    assert set(status.deployments) == {"ingress", "f1_medium", "f2_large"}
    assert status.deployments["f2_large"].replica_states.get("RUNNING") == 2
