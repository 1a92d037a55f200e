"""A run directory from someone else runs none of its code unless the user opts in (``--trust-remote-code``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny import tiny_training
from rich.console import Console
from typer.testing import CliRunner

from routerkit.cli import app
from routerkit.config import ConfigError, apply_overrides, parse_config
from routerkit.training.runner import load_run, train
from routerkit.training.trust import (
    TRUST_FLAG,
    UntrustedRunError,
    check_run_trust,
    code_to_import,
    trust_problem,
    trust_store_path,
)

runner = CliRunner()

# A data plugin that leaves a marker next to itself the moment it is imported: proof that its code ran.
PLUGIN = """
from pathlib import Path

import torch

from routerkit.data import DataBundle, Split

Path(__file__).with_name("imported.marker").write_text("the plugin ran")


def _split(n, seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=gen)
    return Split(images, (images[:, 0] > 0.5).long())


def build():
    return DataBundle(_split(12, 0), _split(4, 1), _split(4, 2), class_names=["background", "foreground"])
"""


def _raw_config(factory: str, **data_params: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": "trust", "seed": 0},
        "data": {"factory": factory, "params": data_params},
        "partitioner": {"name": "patch_grid", "params": {"rows": 2, "cols": 2}},
        "zoo": {
            "models": [
                {"name": "f0", "model": "toy_segmenter", "params": {"width": 2, "dropout": 0.3}},
                {"name": "f1", "model": "toy_segmenter", "params": {"width": 4}},
            ]
        },
        "uncertainty": {"name": "softmax_entropy", "params": {}},
        "evaluation": {"baselines": [], "batch_size": 4},
    }
    return apply_overrides(raw, tiny_training(batch_size=4))


class Plugin:
    """A plugin folder holding one module with a unique name, and the marker its import writes."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "plugins"
        self.folder.mkdir(parents=True)
        self.module = f"trust_plugin_{uuid.uuid4().hex[:8]}"
        (self.folder / f"{self.module}.py").write_text(PLUGIN)
        self.marker = self.folder / "imported.marker"
        self.factory = f"{self.module}:build"

    def forget(self) -> None:
        """Undo an import: the module leaves sys.modules, its folder sys.path, the marker the disk."""
        sys.modules.pop(self.module, None)
        while str(self.folder.resolve()) in sys.path:
            sys.path.remove(str(self.folder.resolve()))
        self.marker.unlink(missing_ok=True)

    def ran(self) -> bool:
        return self.marker.exists() or self.module in sys.modules

    def assert_not_run(self) -> None:
        assert not self.marker.exists(), "the plugin was imported"
        assert self.module not in sys.modules
        assert str(self.folder.resolve()) not in sys.path, "the plugin folder was put on sys.path"


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[Path, Plugin]]:
    """A tiny run trained here (the normal flow) from a plugin data factory; afterwards the plugin is forgotten."""
    plugin = Plugin(tmp_path)
    sys.path.insert(0, str(plugin.folder.resolve()))  # as the CLI does for the config's folder
    cfg = parse_config(_raw_config(plugin.factory), "trust.yaml")
    run_dir, _ = train(cfg, run_dir=tmp_path / "run", plugin_dirs=[str(plugin.folder)], console=Console(file=io.StringIO()))
    plugin.forget()
    yield run_dir, plugin
    plugin.forget()


def test_a_run_trained_here_loads_without_the_flag(trained: tuple[Path, Plugin]) -> None:
    run_dir, plugin = trained
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["run_id"]) == 32
    store = trust_store_path()
    assert Path(os.environ["ROUTERKIT_HOME"]) in store.parents, "tests must never touch the user's trust store"
    entry = json.loads(store.read_text())["runs"][str(run_dir.resolve())]
    assert entry["run_id"] == info["run_id"] and len(entry["config_sha256"]) == 64
    assert trust_problem(run_dir) is None
    exp = load_run(run_dir)
    assert plugin.ran() and len(exp.zoo) == 2
    plugin.forget()
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert plugin.ran()


def test_editing_the_config_revokes_the_trust(trained: tuple[Path, Plugin]) -> None:
    run_dir, plugin = trained
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 1", 1))
    with pytest.raises(UntrustedRunError, match=r"config\.yaml changed") as err:
        load_run(run_dir)
    assert isinstance(err.value, ConfigError)
    message = str(err.value)
    assert TRUST_FLAG in message and plugin.factory in message and str(plugin.folder) in message
    plugin.assert_not_run()
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 2 and TRUST_FLAG in result.output, result.output
    plugin.assert_not_run()
    exp = load_run(run_dir, trust_remote_code=True)  # the user vouches for it
    assert plugin.ran() and exp.config.run.seed == 1


def test_a_replaced_run_json_revokes_the_trust(trained: tuple[Path, Plugin]) -> None:
    run_dir, plugin = trained
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "run_id": "0" * 32}))
    with pytest.raises(UntrustedRunError, match="run id"):
        load_run(run_dir)
    (run_dir / "run.json").write_text(json.dumps({**info, "plugin_dirs": [*info["plugin_dirs"], "/elsewhere"]}))
    with pytest.raises(UntrustedRunError, match=r"run\.json changed"):
        load_run(run_dir)
    plugin.assert_not_run()


def test_a_copied_run_is_refused_by_load_run_and_every_command(trained: tuple[Path, Plugin], tmp_path: Path) -> None:
    run_dir, plugin = trained
    copy = shutil.copytree(run_dir, tmp_path / "downloaded")
    with pytest.raises(UntrustedRunError, match="not created by `routerkit train`"):
        load_run(copy)
    plugin.assert_not_run()
    for command in (
        ["evaluate", str(copy)],
        ["compare", str(copy)],
        ["calibrate", str(copy), "--target-share", "0.5"],
        ["robustness", str(copy)],
        ["train", "--resume", str(copy)],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert TRUST_FLAG in result.output and plugin.factory in result.output, result.output
        assert "Traceback" not in result.output
        plugin.assert_not_run()
    with pytest.raises(UntrustedRunError):
        train(None, resume=copy, console=Console(file=io.StringIO()))  # type: ignore[arg-type]
    plugin.assert_not_run()
    result = runner.invoke(app, ["evaluate", str(copy), TRUST_FLAG])
    assert result.exit_code == 0, result.output
    assert plugin.ran()
    plugin.forget()
    result = runner.invoke(app, ["train", "--resume", str(copy), TRUST_FLAG])
    assert result.exit_code == 0, result.output
    assert plugin.ran()


def _hand_made_run(folder: Path, raw: dict[str, Any], plugin_dirs: list[str]) -> Path:
    """A run directory as someone else could ship it: a config.yaml and a run.json, no entry in our store."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    (folder / "run.json").write_text(json.dumps({"plugin_dirs": plugin_dirs, "run_id": uuid.uuid4().hex}))
    return folder


def test_a_shell_command_as_data_factory_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "shell.marker"
    run_dir = _hand_made_run(tmp_path / "evil", _raw_config("subprocess:run", args=["touch", str(marker)]), [])
    with pytest.raises(UntrustedRunError, match=r"data\.factory: subprocess:run"):
        load_run(run_dir)
    assert not marker.exists()
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "subprocess:run" in result.output and TRUST_FLAG in result.output
    assert not marker.exists(), "the config's shell command ran"
    # The flag is what lets the code run (here it runs `touch`, then the factory's return value is refused).
    with pytest.raises(ConfigError, match="DataBundle"):
        load_run(run_dir, trust_remote_code=True)
    assert marker.exists()


def test_a_plugin_folder_is_not_put_on_sys_path(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    try:
        run_dir = _hand_made_run(tmp_path / "evil", _raw_config(plugin.factory), [str(plugin.folder)])
        with pytest.raises(UntrustedRunError) as err:
            load_run(run_dir)
        assert f"run.json plugin_dirs: {plugin.folder}" in str(err.value)
        plugin.assert_not_run()
    finally:
        plugin.forget()


def test_what_needs_trust(tmp_path: Path) -> None:
    raw = _raw_config("routerkit.data.folder_dataset:folder_dataset")  # routerkit's registered components: no trust
    raw["zoo"]["models"][1]["model"] = "routerkit.models:ToySegmenter"
    plain = _hand_made_run(tmp_path / "plain", raw, [])
    assert code_to_import(plain) == []
    check_run_trust(plain)  # nothing to refuse, whoever made it
    # any other class of routerkit is not a component: it needs trust like user code
    other = _hand_made_run(tmp_path / "other", _raw_config("routerkit.training.run_lock:RunLock"), [])
    assert code_to_import(other) == ["data.factory: routerkit.training.run_lock:RunLock"]
    raw = _raw_config("routerkit.config.build:add_plugin_path")  # routerkit, but a helper, not a component
    raw["zoo"]["models"][1]["model"] = "mypkg.zoo:Net"
    raw["router"] = {"name": "mypkg.routers:Mine"}
    raw["uncertainty"] = {"name": "routerkit._registry:import_object"}
    raw["cost"] = {"name": "flops"}
    raw["reward"] = {"name": "paser", "accuracy": "mypkg.acc:Term"}
    mixed = _hand_made_run(tmp_path / "mixed", raw, ["/somewhere"])
    assert code_to_import(mixed) == [
        "data.factory: routerkit.config.build:add_plugin_path",
        "zoo.models.1.model: mypkg.zoo:Net",
        "uncertainty.name: routerkit._registry:import_object",
        "router.name: mypkg.routers:Mine",
        "reward.accuracy: mypkg.acc:Term",
        "run.json plugin_dirs: /somewhere (put on sys.path)",
    ]
    with pytest.raises(UntrustedRunError):
        check_run_trust(mixed)
    check_run_trust(mixed, trust_remote_code=True)
