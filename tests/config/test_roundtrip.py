"""A run's saved config.yaml loads back to the same values (every shipped example, folder data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from routerkit.config import config_to_dict, dump_config, load_config, parse_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _round_trip(cfg):  # type: ignore[no-untyped-def]
    back = parse_config(yaml.safe_load(dump_config(cfg)), "config.yaml")
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    return back


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_round_trips(path: Path) -> None:
    _round_trip(load_config(path))


def test_folder_config_keeps_int_value_map_keys(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "examples" / "battery.yaml").read_text()
    raw = yaml.safe_load(text)
    raw["data"] = {
        "factory": "folder",
        "params": {"root": str(tmp_path), "value_map": {0: 0, 128: 1, 255: 2}, "class_names": ["a", "b", "c"]},
    }
    back = _round_trip(parse_config(raw))
    assert back.data.params["value_map"] == {0: 0, 128: 1, 255: 2}
    assert all(isinstance(k, int) for k in back.data.params["value_map"])
