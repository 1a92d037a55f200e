"""Tests of routerkit.training.checkpoint: safetensors round trips, latest.json and atomic writes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from routerkit.config import ConfigError
from routerkit.training import checkpoint as ckpt
from routerkit.training.checkpoint import CheckpointError, load_checkpoint, read_latest, save_checkpoint, to_device


def trained_state() -> tuple[nn.Module, torch.optim.Optimizer, dict[str, object]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 1, 5, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(4, 1, 5, 5)).pow(2).mean()
    loss.backward()
    opt.step()
    state = {
        "modules": {"net": model.state_dict()},
        "optimizers": {"net": opt.state_dict()},
        "generator": torch.Generator().manual_seed(3).get_state(),
        "epoch": 3,
        "history": [1.5, None, "text", True, {"nested": torch.arange(4)}],
    }
    return model, opt, state


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_module_and_adam_state(tmp_path: Path) -> None:
    model, opt, state = trained_state()
    path = save_checkpoint(tmp_path, "stage1-epoch0001", state, {"stage": "policy", "epoch": 1})
    assert path == tmp_path / "checkpoints" / "stage1-epoch0001.safetensors" and path.is_file()
    loaded, meta = load_checkpoint(tmp_path)
    assert meta == {"stage": "policy", "epoch": 1}
    assert_same(state, loaded)
    # Integer keys of the optimizer state survive, so the state dict loads into a fresh optimizer.
    assert all(isinstance(k, int) for k in loaded["optimizers"]["net"]["state"])
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 2))
    fresh.load_state_dict(loaded["modules"]["net"])
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(loaded["optimizers"]["net"])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same(opt.state_dict(), fresh_opt.state_dict())
    # Training goes on from the restored state exactly as from the original one.
    x = torch.randn(4, 1, 5, 5)
    for net, optim in ((model, opt), (fresh, fresh_opt)):
        optim.zero_grad()
        net(x).pow(2).mean().backward()
        optim.step()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.allclose(p, q)
    gen = torch.Generator()
    gen.set_state(loaded["generator"])
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(3)))


def test_shared_memory_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    state = {"a": base, "b": base, "view": base[2:4]}
    save_checkpoint(tmp_path, "shared", state, {})
    loaded, _ = load_checkpoint(tmp_path, "shared")
    assert_same({"a": base, "b": base, "view": base[2:4].clone()}, loaded)


def test_latest_names_newest_and_old_ones_are_pruned(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    assert read_latest(tmp_path) is None
    save_checkpoint(tmp_path, "e1", {"x": torch.ones(1)}, {"epoch": 1})
    save_checkpoint(tmp_path, "e2", {"x": torch.full((1,), 2.0)}, {"epoch": 2, "stage_complete": True})
    save_checkpoint(tmp_path, "e3", {"x": torch.full((1,), 3.0)}, {"epoch": 3})
    assert read_latest(tmp_path) == "e3"
    assert json.loads((folder / "latest.json").read_text()) == {"name": "e3", "metadata": {"epoch": 3}}
    loaded, meta = load_checkpoint(tmp_path)
    assert loaded["x"].item() == 3.0 and meta["epoch"] == 3
    assert not (folder / "e1.safetensors").exists() and not (folder / "e1.json").exists()
    # A stage-end checkpoint is kept even when a newer one replaces it as latest.
    assert (folder / "e2.safetensors").exists() and (folder / "e2.json").exists()
    assert load_checkpoint(tmp_path, "e2")[0]["x"].item() == 2.0


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, "good", {"w": torch.arange(5.0)}, {"epoch": 1})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:  # 1: tensors, 2: metadata, 3: latest.json
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "bad", {"w": torch.zeros(5)}, {"epoch": 2})
    monkeypatch.setattr(os, "replace", real_replace)

    for name, data in before.items():
        assert (folder / name).read_bytes() == data, name
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert read_latest(tmp_path) == "good"
    loaded, meta = load_checkpoint(tmp_path)
    assert torch.equal(loaded["w"], torch.arange(5.0)) and meta == {"epoch": 1}


def test_atomic_write_bytes_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "file.bin"
    ckpt.atomic_write_bytes(target, b"old")

    def boom(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_missing_run_raises_naming_path(tmp_path: Path) -> None:
    run = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(run)
    assert str(run / "checkpoints") in str(info.value)
    save_checkpoint(tmp_path, "only", {"x": torch.ones(1)}, {})
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(tmp_path, "other")
    assert str(tmp_path / "checkpoints" / "other.safetensors") in str(info.value)
    (tmp_path / "checkpoints" / "only.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"only\.json"):
        load_checkpoint(tmp_path)


def test_unsupported_values_raise(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Cannot checkpoint a value of type object"):
        save_checkpoint(tmp_path, "x", {"bad": object()}, {})
    with pytest.raises(TypeError, match="dictionary key of type tuple"):
        save_checkpoint(tmp_path, "x", {"bad": {(1, 2): 3}}, {})


def test_keys_containing_slash_do_not_collide(tmp_path: Path) -> None:
    state = {"a/b": torch.zeros(2), "a": {"b": torch.ones(2)}}
    save_checkpoint(tmp_path, "slash", state, {})
    loaded, _ = load_checkpoint(tmp_path, "slash")
    assert torch.equal(loaded["a/b"], torch.zeros(2))
    assert torch.equal(loaded["a"]["b"], torch.ones(2))


def test_to_device_nested() -> None:
    obj = {"a": [torch.ones(1), {"b": torch.zeros(2)}], "c": 3}
    moved = to_device(obj, "cpu")
    assert_same(obj, moved)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_policy_stage_resumes_exactly_from_checkpoint(tmp_path: Path, tiny_seg_bundle, schedule: str) -> None:  # type: ignore[no-untyped-def]
    from routerkit import PatchGrid, RoutedPipeline, Zoo
    from routerkit.models import ToySegmenter
    from routerkit.rewards import PaSeRReward, UnitIoU
    from routerkit.routers import PaSeRRouter
    from routerkit.training.policy import PolicyTraining
    from routerkit.training.schedules import StageSettings

    def make() -> tuple[PolicyTraining, PaSeRRouter]:
        torch.manual_seed(0)
        zoo = Zoo([ToySegmenter(1, 2, width=2, dropout=0.3), ToySegmenter(1, 2, width=6)])
        pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "softmax_entropy", "param_share", (1, 8, 8))
        router = PaSeRRouter(2, grid_shape=(2, 2), in_channels=3, width=2)
        settings = StageSettings(epochs=3, lr=1e-2, batch_size=4, lr_schedule=schedule)
        stage = PolicyTraining(pipe, router, PaSeRReward(0.3), UnitIoU(2), tiny_seg_bundle.train, settings, seed=5)
        return stage, router

    straight, router_a = make()
    for epoch in range(3):
        logs_a = straight.train_epoch(epoch)
    last_lr = straight.optimizers["router"].param_groups[0]["lr"]
    assert last_lr == pytest.approx(1e-2 if schedule == "constant" else 1e-2 * 0.25)

    first, _ = make()
    first.train_epoch(0)
    save_checkpoint(tmp_path, "policy-epoch0000", first.state_dict(), {"epoch": 0})
    resumed, router_b = make()
    state, meta = load_checkpoint(tmp_path)
    resumed.load_state_dict(state)
    for epoch in range(meta["epoch"] + 1, 3):
        logs_b = resumed.train_epoch(epoch)
    assert logs_a == pytest.approx(logs_b)
    assert resumed.optimizers["router"].param_groups[0]["lr"] == pytest.approx(last_lr)
    for p, q in zip(router_a.state_dict().values(), router_b.state_dict().values(), strict=True):
        assert torch.allclose(p.float(), q.float())


# ---------------------------------------------------------------- corrupted files


def _set_header_length(data: bytes, length: int) -> bytes:
    return struct.pack("<Q", length) + data[8:]


def _garbage_header(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"\xff" * length + data[8 + length :]


def _other_tensors(path: Path) -> None:  # the JSON names tensors this safetensors file does not hold
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(1)}, str(path))


# (file to corrupt, how: bytes -> bytes or a path function, what the message says it expected)
CORRUPTIONS = {
    "safetensors-truncated": ("x.safetensors", lambda b: b[: len(b) // 2], "expected a safetensors file"),
    "safetensors-empty": ("x.safetensors", lambda b: b"", "expected a safetensors file"),
    "safetensors-oversized-header": ("x.safetensors", lambda b: _set_header_length(b, 2**40), "header too large"),
    "safetensors-header-past-the-end": ("x.safetensors", lambda b: _set_header_length(b, len(b)), "expected a safetensors"),
    "safetensors-garbage-header": ("x.safetensors", _garbage_header, "expected a safetensors file"),
    "safetensors-of-another-checkpoint": ("x.safetensors", _other_tensors, "do not belong together: expected tensor 't000000'"),
    "json-truncated": ("x.json", lambda b: b[: len(b) // 2], 'expected a JSON object {"metadata"'),
    "json-garbage": ("x.json", lambda b: b"\x00\xff\xfe garbage", 'expected a JSON object {"metadata"'),
    "json-not-a-checkpoint": ("x.json", lambda b: b'{"hello": 1}', "but got an object with keys ['hello']"),
    "json-a-list": ("x.json", lambda b: b"[1, 2]", "but got a JSON list"),
    "json-bad-skeleton": ("x.json", lambda b: b'{"metadata": {}, "skeleton": {"__dict__": 5}}', "skeleton does not parse"),
    "latest-truncated": ("latest.json", lambda b: b[: len(b) // 2], 'expected a JSON object {"name"'),
    "latest-garbage": ("latest.json", lambda b: b"\xff\xfe\x00", 'expected a JSON object {"name"'),
    "latest-without-name": ("latest.json", lambda b: b'{"metadata": {}}', "but got an object with keys ['metadata']"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path: Path, case: str) -> None:
    _, _, state = trained_state()
    save_checkpoint(tmp_path, "x", state, {"epoch": 3})
    filename, corrupt, expected = CORRUPTIONS[case]
    path = tmp_path / "checkpoints" / filename
    if corrupt is _other_tensors:
        corrupt(path)
    else:
        path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert isinstance(info.value, ConfigError)  # the command line prints it as an error


def test_save_replaces_an_unreadable_latest(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "a", {"x": torch.ones(1)}, {})
    (tmp_path / "checkpoints" / "latest.json").write_bytes(b"\xff{")
    save_checkpoint(tmp_path, "b", {"x": torch.zeros(1)}, {})
    assert read_latest(tmp_path) == "b"
    assert (tmp_path / "checkpoints" / "a.json").exists()  # not pruned: it could not be told apart


# ---------------------------------------------------------------- temp files of a killed write


STALE = [".final.safetensors.ab3_x9zq.tmp", ".latest.json.k2j_x9zz.tmp", ".2-policy-e0001.json.00000000.tmp"]
NOT_STALE = [
    "notes.tmp",
    ".hidden.tmp",
    ".final.safetensors.tmp",  # no random part
    "final.safetensors.ab3_x9zq.tmp",  # no leading dot
    ".final.safetensors.ab3_x9zq.tmp.bak",
    ".final.safetensors.AB3_X9ZQ.tmp",  # mkstemp draws lower case only
    ".final.safetensors.ab3x9.tmp",  # 5 random characters, not 8
    ".final.pt.ab3_x9zq.tmp",  # not a checkpoint file
    "final.safetensors",
]


def test_save_removes_stale_temp_files_and_nothing_else(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in STALE + NOT_STALE:
        (folder / name).write_bytes(b"partial")
    (folder / ".dir.json.abcdefgh.tmp").mkdir()  # a folder of that name is left alone
    (tmp_path / ".outside.json.abcdefgh.tmp").write_bytes(b"x")  # so is anything outside checkpoints/
    save_checkpoint(tmp_path, "new", {"x": torch.ones(1)}, {})
    left = {p.name for p in folder.iterdir()}
    assert not left & set(STALE)
    assert set(NOT_STALE) | {".dir.json.abcdefgh.tmp", "new.safetensors", "new.json", "latest.json"} == left
    assert (tmp_path / ".outside.json.abcdefgh.tmp").exists()


def test_a_killed_write_leaves_a_temp_file_the_next_save_removes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(fd: int) -> None:
        raise SystemExit("killed")  # stands in for SIGKILL: the temp file stays (no cleanup runs after a real kill)

    save_checkpoint(tmp_path, "a", {"x": torch.ones(1)}, {})
    monkeypatch.setattr(os, "fsync", killed)
    monkeypatch.setattr(os, "unlink", lambda path: None)  # a real kill runs no except clause
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, "b", {"x": torch.zeros(1)}, {})
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert ckpt._STALE_TMP.fullmatch(next(p.name for p in folder.iterdir() if p.name.endswith(".tmp")))
    save_checkpoint(tmp_path, "c", {"x": torch.zeros(1)}, {})
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- loading into the models of a run


def _tiny_experiment(router: str = "paser") -> SimpleNamespace:
    from routerkit import Zoo, create_router
    from routerkit.models import ToySegmenter

    torch.manual_seed(0)
    zoo = Zoo({"small": ToySegmenter(width=2), "big": ToySegmenter(width=4)})
    params = {"grid_shape": (2, 2), "in_channels": 3, "width": 2} if router == "paser" else {}
    return SimpleNamespace(zoo=zoo, router=create_router(router, num_actions=2, **params))


def _model_state(exp: SimpleNamespace) -> dict[str, dict[str, torch.Tensor]]:
    return {"zoo": exp.zoo.state_dict(), "router": exp.router.state_dict()}


def _drop(state: dict[str, dict[str, torch.Tensor]], part: str, key: str) -> None:
    del state[part][key]


def _set(state: dict[str, dict[str, torch.Tensor]], part: str, key: str, value: torch.Tensor) -> None:
    state[part][key] = value


def _fill(state: dict[str, dict[str, torch.Tensor]], part: str, value: float) -> None:
    for key, tensor in state[part].items():
        if tensor.is_floating_point():
            state[part][key] = torch.full_like(tensor, value)


MISMATCHES = {
    "zoo-missing-key": (
        lambda s: _drop(s, "zoo", "members.1.net.0.weight"),
        ["zoo model 'big': missing keys 'members.1.net.0.weight'"],
    ),
    "router-missing-key": (
        lambda s: _drop(s, "router", "policy.head.bias"),
        ["router (PaSeRRouter): missing keys 'policy.head.bias'"],
    ),
    "unexpected-key": (
        lambda s: _set(s, "router", "policy.extra.weight", torch.zeros(2)),
        ["router (PaSeRRouter): unexpected keys 'policy.extra.weight'"],
    ),
    "wrong-shape": (
        lambda s: _set(s, "zoo", "members.0.net.0.weight", torch.zeros(5, 1, 3, 3)),
        ["zoo model 'small': expected 'members.0.net.0.weight' of shape [2, 1, 3, 3] but got [5, 1, 3, 3]"],
    ),
    "not-a-tensor": (
        lambda s: _set(s, "router", "logit_bias", 3),  # type: ignore[arg-type]
        ["router (PaSeRRouter): expected 'logit_bias' to be a tensor but got int"],
    ),
    "no-router-state": (lambda s: s.pop("router"), ["expected a model state with 'zoo' and 'router' state dicts but got"]),
    "all-nan-zoo": (
        lambda s: _fill(s, "zoo", float("nan")),
        ["expected finite weights but got NaN or inf in", "zoo model 'small' 'members.0.net.0.weight'", "more"],
    ),
    "inf-router-weight": (
        lambda s: s["router"]["policy.head.weight"].view(-1)[0].fill_(float("inf")),
        ["expected finite weights but got NaN or inf in 1 tensor(s): router (PaSeRRouter) 'policy.head.weight'"],
    ),
    "nan-router-buffer": (
        lambda s: _set(s, "router", "entropy_scale", torch.tensor(float("nan"))),
        ["NaN or inf in 1 tensor(s): router (PaSeRRouter) 'entropy_scale'"],
    ),
    "inf-zoo-bias": (
        lambda s: _set(s, "zoo", "members.1.net.0.bias", torch.full((4,), float("-inf"))),
        ["NaN or inf in 1 tensor(s): zoo model 'big' 'members.1.net.0.bias'"],
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_load_model_state_names_checkpoint_module_and_tensors(case: str) -> None:
    from routerkit.training.weights import load_model_state as _load_model_state

    exp = _tiny_experiment()
    state = _model_state(_tiny_experiment())
    corrupt, expected = MISMATCHES[case]
    corrupt(state)
    before = {k: v.clone() for k, v in exp.zoo.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        _load_model_state(exp, state, "RUN/checkpoints/final.safetensors")  # type: ignore[arg-type]
    message = str(info.value)
    assert "Checkpoint RUN/checkpoints/final.safetensors" in message
    for text in expected:
        assert text in message, message
    for key, value in exp.zoo.state_dict().items():  # nothing was half-loaded
        assert torch.equal(value, before[key])


def test_load_model_state_loads_a_good_state_and_unfitted_idk_thresholds() -> None:
    from routerkit.training.weights import load_model_state as _load_model_state

    source, target = _tiny_experiment(), _tiny_experiment()
    for p in source.zoo.parameters():
        p.data.add_(1.0)
    _load_model_state(target, _model_state(source))  # type: ignore[arg-type]
    for p, q in zip(source.zoo.parameters(), target.zoo.parameters(), strict=True):
        assert torch.equal(p, q)
    idk = _tiny_experiment("idk")
    assert torch.isinf(idk.router.thresholds).all()  # +inf: "never forward" until the cascade is fitted
    _load_model_state(_tiny_experiment("idk"), _model_state(idk))  # type: ignore[arg-type]
    nan = _model_state(idk)
    nan["router"]["thresholds"] = torch.full_like(idk.router.thresholds, float("nan"))
    with pytest.raises(CheckpointError, match="router \\(IDKCascade\\) 'thresholds'"):
        _load_model_state(_tiny_experiment("idk"), nan)  # type: ignore[arg-type]
