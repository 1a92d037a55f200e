"""Tests of routerkit.config: YAML loading, readable validation errors and overrides."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from routerkit.config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config
from routerkit.config.schema import ZooConfig

BASE: dict[str, Any] = {
    "run": {"name": "toy", "seed": 3},
    "data": {"factory": "my_plugin.data:make_bundle", "params": {"n": 8}},
    "partitioner": {"name": "patch_grid", "params": {"rows": 2, "cols": 2}},
    "zoo": {
        "models": [
            {"name": "small", "model": "toy_segmenter", "params": {"dropout": 0.2, "width": 2}},
            {"name": "big", "model": "toy_segmenter", "params": {"width": 8}},
        ]
    },
    "uncertainty": {"name": "mc_dropout", "params": {"num_passes": 4}},
    "cost": {"name": "param_share"},
    "reward": {"lam": 0.25, "accuracy": "iou"},
    "training": {"policy": {"epochs": 2, "lr": 0.01, "batch_size": 4}},
}


def write(tmp_path: Path, raw: Any, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def raw_config() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def test_load_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, raw_config()))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.name == "toy" and cfg.run.seed == 3
    assert cfg.data.factory == "my_plugin.data:make_bundle" and cfg.data.params == {"n": 8}
    assert [m.name for m in cfg.zoo.models] == ["small", "big"]
    assert cfg.zoo.models[0].params["dropout"] == 0.2
    assert cfg.uncertainty.params == {"num_passes": 4}
    assert cfg.reward.lam == 0.25
    assert cfg.training.policy.epochs == 2 and cfg.training.policy.lr == 0.01
    # defaults
    assert cfg.router.name == "paser" and cfg.cost.name == "param_share"
    assert cfg.training.finetune.alpha_end == 1.0
    assert cfg.evaluation.baselines == ["single", "random"]


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("training", "policy"), {"lrr": 0.1}, "training.policy.lrr"),
        ((), {"extra_section": {}}, "extra_section"),
        (("run",), {"nmae": "x"}, "run.nmae"),
    ],
)
def test_unknown_field_names_path(tmp_path: Path, path: tuple[str, ...], value: dict[str, Any], field: str) -> None:
    raw = raw_config()
    node = raw
    for key in path:
        node = node.setdefault(key, {})
    node.update(value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    message = str(info.value)
    assert f"{field}: unknown field" in message
    assert str(tmp_path / "exp.yaml") in message


def test_unknown_field_in_list_item(tmp_path: Path) -> None:
    raw = raw_config()
    raw["zoo"]["models"][1]["parms"] = {}
    with pytest.raises(ConfigError, match=r"zoo\.models\.1\.parms: unknown field"):
        load_config(write(tmp_path, raw))


def test_value_errors_name_the_field(tmp_path: Path) -> None:
    raw = raw_config()
    raw["reward"]["lam"] = 1.5
    raw["training"]["policy"]["batch_size"] = 0
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    assert "reward.lam" in str(info.value) and "training.policy.batch_size" in str(info.value)
    raw = raw_config()
    del raw["data"]
    with pytest.raises(ConfigError, match=r"  - data: Field required"):
        parse_config(raw)


def test_mc_dropout_without_base_dropout(tmp_path: Path) -> None:
    raw = raw_config()
    raw["zoo"]["models"][0]["params"].pop("dropout")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    message = str(info.value)
    assert "mc_dropout" in message and "zoo.models[0]" in message and "dropout" in message
    # Fixes named in the message are accepted.
    assert load_config(write(tmp_path, raw), ["uncertainty.name=softmax_entropy", "uncertainty.params={}"])
    assert load_config(write(tmp_path, raw), ["zoo.models.0.params.dropout=0.1"]).zoo.models[0].params["dropout"] == 0.1


def test_other_cross_checks() -> None:
    raw = raw_config()
    raw["training"]["policy"].update(alpha_start=0.9, alpha_end=0.5)
    with pytest.raises(ConfigError, match=r"training\.policy\.alpha_end"):
        parse_config(raw)
    raw = raw_config()
    raw["zoo"]["models"][1]["name"] = "small"
    with pytest.raises(ConfigError, match="unique"):
        parse_config(raw)
    raw = raw_config()
    raw["data"]["split_fractions"] = [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="split_fractions"):
        parse_config(raw)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, raw_config())
    cfg = load_config(
        path,
        [
            "run.seed=3",
            "reward.lam=0.75",
            "run.name=other",
            "training.policy.baseline=mean",
            "evaluation.baselines=[single]",
            "zoo.models.1.params.width=16",
            "zoo.models.1.name=huge",
            "cost.params.base_cost=zero",
            "run.threads=",
        ],
    )
    assert cfg.run.seed == 3 and isinstance(cfg.run.seed, int)
    assert cfg.reward.lam == 0.75
    assert cfg.run.name == "other"
    assert cfg.training.policy.baseline == "mean"
    assert cfg.evaluation.baselines == ["single"]
    assert cfg.zoo.models[1].params["width"] == 16 and cfg.zoo.models[1].name == "huge"
    assert cfg.cost.name == "param_share" and cfg.cost.params == {"base_cost": "zero"}
    assert cfg.run.threads is None


def test_apply_overrides_on_raw_dicts() -> None:
    raw: dict[str, Any] = {"a": {"b": 1}, "items": [{"x": 1}, {"x": 2}], "values": [1, 2, 3]}
    out = apply_overrides(raw, ["a.b=3", "a.c.d=true", "items.1.x=[1, 2]", "values.0=hello", "new=1.5e-3"])
    assert out is raw
    assert raw["a"] == {"b": 3, "c": {"d": True}}
    assert raw["items"] == [{"x": 1}, {"x": [1, 2]}]
    assert raw["values"] == ["hello", 2, 3]
    assert raw["new"] == pytest.approx(1.5e-3)


@pytest.mark.parametrize("override", ["uncertainty.params.num_passes=5", "router.params.width=4"])
def test_override_param_of_defaulted_section(override: str) -> None:
    raw = raw_config()
    raw.pop("uncertainty")
    cfg = parse_config(apply_overrides(raw, [override]))
    assert cfg.uncertainty.name == "mc_dropout" and cfg.router.name == "paser"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("run.seed", "must look like"),
        ("=3", "empty key"),
        ("run.seed.x=1", "'seed' is not a section|cannot set"),
        ("zoo.models.name=x", "is not a section|cannot set"),
    ],
)
def test_bad_overrides(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(raw_config(), [override])


@pytest.mark.parametrize("override", ["zoo.models.5.name=x", "zoo.models.2=x"])
def test_out_of_range_list_override_is_config_error(override: str) -> None:
    with pytest.raises(ConfigError):
        apply_overrides(raw_config(), [override])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: {name: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))
    empty = write(tmp_path, "", name="empty.yaml")
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(empty)


# --- fuzzed configs: every bad value is a ConfigError naming its field ---------------------------------------------


def _leaf_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, annotation)`` of every field of the schema that is not a section."""
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation is not ZooConfig:  # a list of models: covered by the zoo tests
                out += _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", annotation))
    return out


def _kinds(annotation: Any) -> set[Any]:
    return {annotation} | {k for arg in get_args(annotation) for k in _kinds(arg)}


FLOAT_FIELDS = [path for path, ann in _leaf_fields() if float in _kinds(ann) and get_origin(ann) not in (list, tuple)]
FLOAT_LIST_FIELDS = [path for path, ann in _leaf_fields() if get_origin(ann) is list and float in _kinds(ann)]
INT_FIELDS = [path for path, ann in _leaf_fields() if int in _kinds(ann)]


def test_the_field_lists_cover_the_schema() -> None:
    assert {"reward.lam", "training.policy.lr", "training.pretrain_base.beta", "training.finetune.large_lr"} <= set(FLOAT_FIELDS)
    assert "compare.sweep_lambdas" in FLOAT_LIST_FIELDS
    assert {"run.seed", "training.policy.epochs", "evaluation.batch_size", "compare.stop_epochs"} <= set(INT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_rejected_everywhere(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"  - {re.escape(field)}: Expected a finite number but got"):
        parse_config(apply_overrides(raw_config(), [f"{field}={value}"]))


@pytest.mark.parametrize("field", FLOAT_LIST_FIELDS)
def test_non_finite_floats_in_lists_are_rejected(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"  - {re.escape(field)}\.1: Expected a finite number"):
        parse_config(apply_overrides(raw_config(), [f"{field}=[0.1, .inf]"]))
    with pytest.raises(ConfigError, match=r"data\.split_fractions\.0: Expected a finite number"):
        parse_config(apply_overrides(raw_config(), ["data.split_fractions=[.nan, 0.5, 0.5]"]))


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", ["true", "false"])
def test_ints_do_not_accept_booleans(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"  - {re.escape(field)}: Expected a valid integer but got (True|False)"):
        parse_config(apply_overrides(raw_config(), [f"{field}={value}"]))


def test_bool_is_not_an_epoch_count_nor_a_number() -> None:
    with pytest.raises(ConfigError, match=r"training\.policy\.epochs: Expected a valid integer but got True"):
        parse_config(apply_overrides(raw_config(), ["training.policy.epochs=true"]))
    with pytest.raises(ConfigError, match=r"zoo\.models\.1\.train_on\.noise: Expected a valid integer"):
        parse_config(apply_overrides(raw_config(), ["zoo.models.1.train_on={noise: true}"]))
    with pytest.raises(ConfigError, match=r"reward\.lam: Expected a number but got the boolean True"):
        parse_config(apply_overrides(raw_config(), ["reward.lam=true"]))
    assert parse_config(apply_overrides(raw_config(), ["training.policy.epochs=3"])).training.policy.epochs == 3


@pytest.mark.parametrize(
    "field", ["training.policy.lr", "training.pretrain_large.lr", "training.finetune.large_lr", "training.cascade.lr"]
)
def test_learning_rates_have_an_upper_bound(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: Expected a value less than or equal to 10"):
        parse_config(apply_overrides(raw_config(), [f"{field}=1.0e30"]))
    assert parse_config(apply_overrides(raw_config(), [f"{field}=10"]))


@pytest.mark.parametrize("field", ["run.seed", "evaluation.random_seed"])
def test_seeds_fit_in_63_bits(field: str) -> None:
    for bad in (2**63, 2**64 + 1, -1):
        with pytest.raises(ConfigError, match=re.escape(field)):
            parse_config(apply_overrides(raw_config(), [f"{field}={bad}"]))
    assert parse_config(apply_overrides(raw_config(), [f"{field}={2**63 - 1}"]))


def test_output_dir_that_is_a_file(tmp_path: Path) -> None:
    existing = tmp_path / "runs.txt"
    existing.write_text("not a folder")
    for output_dir in (existing, existing / "sub"):
        with pytest.raises(ConfigError, match=r"run\.output_dir: Expected a folder .* is an existing file"):
            parse_config(apply_overrides(raw_config(), [f"run.output_dir={output_dir}"]))
    with pytest.raises(ConfigError, match=r"run\.name: .* is an existing file"):
        parse_config(apply_overrides(raw_config(), [f"run.output_dir={tmp_path}", "run.name=runs.txt"]))
    assert parse_config(apply_overrides(raw_config(), [f"run.output_dir={tmp_path / 'new' / 'runs'}"]))


@pytest.mark.parametrize("device", ["meta", "xla", "cuda:x", "cpu:cuda", "Cuda", ""])
def test_devices_that_cannot_train(device: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.device: Expected a device that can train"):
        parse_config(apply_overrides(raw_config(), [f"run.device='{device}'"]))


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_devices_that_can_train_pass_the_schema(device: str) -> None:
    assert parse_config(apply_overrides(raw_config(), [f"run.device={device}"])).run.device == device


@pytest.mark.parametrize("dropout", ["[0.1]", "high", "true", "1.5", ".nan", "{p: 0.1}"])
def test_base_dropout_of_the_wrong_type_names_the_field(dropout: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(apply_overrides(raw_config(), [f"zoo.models.0.params.dropout={dropout}"]))
    message = str(info.value)
    assert "  - zoo.models.0.params.dropout: Expected the dropout probability of f_0, a number in [0, 1)" in message
    assert "(top level)" not in message


def test_cross_field_rules_are_reported_under_their_field() -> None:
    raw = raw_config()
    raw["training"]["policy"].update(alpha_start=0.9, alpha_end=0.5)
    with pytest.raises(ConfigError, match=r"  - training\.policy\.alpha_end: "):
        parse_config(raw)
    raw = raw_config()
    raw["zoo"]["models"][0]["params"].pop("dropout")
    with pytest.raises(ConfigError, match=r"  - zoo\.models\.0\.params\.dropout: uncertainty\.name is 'mc_dropout'"):
        parse_config(raw)


@pytest.mark.parametrize("override", ["a.b=[1", "run.name={x: 1", "reward.lam=: :", "run.seed='3"])
def test_bad_yaml_in_an_override_is_a_config_error(override: str) -> None:
    with pytest.raises(ConfigError, match=r"expected a YAML value after '='"):
        apply_overrides(raw_config(), [override])


def test_non_utf8_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(raw_config()).encode() + "# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"Config file {re.escape(str(path))}: expected UTF-8 text"):
        load_config(path)
