"""Tests of routerkit.config.build: the zoo gets the data's channels and classes where it takes them."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from routerkit.config import ConfigError, apply_overrides, parse_config
from routerkit.config.build import build_experiment, build_zoo
from routerkit.config.checks import check_device, check_params, check_zoo_outputs, config_problems
from routerkit.data import DataBundle, Split
from routerkit.partitioners import PatchGrid


class ClassesOnly(nn.Module):
    """A user model that takes ``num_classes`` but not ``in_channels``."""

    def __init__(self, num_classes: int, hidden: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.LazyLinear(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(x.flatten(1))
        return out


def _cfg(models: list[dict[str, Any]]) -> Any:
    return parse_config(
        {
            "run": {"name": "build"},
            "data": {"factory": "my_plugin.data:make_bundle"},
            "zoo": {"models": models},
            "uncertainty": {"name": "softmax_entropy"},
        }
    )


def test_channels_and_classes_filled_by_signature() -> None:
    cfg = _cfg(
        [
            {"name": "r8", "model": "cifar_resnet8"},
            {"name": "unet", "model": "unet", "params": {"base_channels": 4, "depth": 1}},
            {"name": "user", "model": f"{__name__}:ClassesOnly"},
        ]
    )
    zoo = build_zoo(cfg, in_channels=1, num_classes=7)
    x = torch.rand(2, 1, 16, 16)
    assert zoo[0](x).shape == (2, 7)
    assert zoo[1](x).shape == (2, 7, 16, 16)
    assert zoo[2].num_classes == 7


def test_explicit_params_win() -> None:
    cfg = _cfg(
        [
            {"name": "r8", "model": "cifar_resnet8", "params": {"num_classes": 4, "in_channels": 3}},
            {"name": "r20", "model": "cifar_resnet20"},
        ]
    )
    zoo = build_zoo(cfg, in_channels=1, num_classes=7)
    assert zoo[0](torch.rand(1, 3, 8, 8)).shape == (1, 4)


def test_unknown_model_names_the_field() -> None:
    cfg = _cfg([{"name": "r8", "model": "cifar_resnet8"}, {"name": "r9", "model": "cifar_resnet9"}])
    with pytest.raises(ConfigError, match=r"zoo.models.1 \('r9'\).*cifar_resnet8"):
        build_zoo(cfg, in_channels=3, num_classes=10)


# --- the experiment is checked against the data when it is built ---------------------------------------------------


class Downsampler(nn.Module):
    """A user model whose logits are half the input's size (a segmenter missing its upsampling)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


def _bundle(num_train: int = 6, classes: int = 3, meta: dict[str, torch.Tensor] | None = None, dense: bool = True) -> DataBundle:
    def split(n: int) -> Split:
        images = torch.rand(n, 1, 8, 8)
        targets = torch.randint(0, classes, (n, 8, 8) if dense else (n,))
        return Split(images, targets, {k: v[:n] for k, v in (meta or {}).items()})

    return DataBundle(split(num_train), split(3), split(3), [f"c{i}" for i in range(classes)])


def _experiment_cfg(*overrides: str, models: list[dict[str, Any]] | None = None) -> Any:
    raw = {
        "run": {"name": "build"},
        "data": {"factory": "my_plugin.data:make_bundle"},
        "partitioner": {"name": "patch_grid", "params": {"rows": 2, "cols": 2}},
        "zoo": {
            "models": models
            or [
                {"name": "small", "model": "toy_segmenter", "params": {"width": 2}},
                {"name": "big", "model": "toy_segmenter", "params": {"width": 4}},
            ]
        },
        "uncertainty": {"name": "softmax_entropy", "params": {}},
    }
    return parse_config(apply_overrides(raw, list(overrides)))


def test_a_matching_zoo_builds() -> None:
    exp = build_experiment(_experiment_cfg(), _bundle())
    assert len(exp.zoo) == 2 and exp.zoo[1].training  # the shape check restores each model's mode


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["zoo.models.1.params.num_classes=5"],
            r"zoo\.models\.1 \('big'\): Expected logits of shape \[1, 3, 4, 4\] for one unit of shape \[1, 1, 4, 4\] "
            r"but got \[1, 5, 4, 4\]",
        ),
        (
            ["zoo.models.0.params.num_classes=2"],
            r"zoo\.models\.0 \('small'\): Expected logits of shape \[1, 3, 8, 8\] for one input of shape \[1, 1, 8, 8\] "
            r"but got \[1, 2, 8, 8\]",
        ),
        (
            ["zoo.models.1.params.in_channels=3"],
            r"zoo\.models\.1 \('big'\): Expected the model to map one unit of shape \[1, 1, 4, 4\] to logits "
            r"\[1, 3, 4, 4\] but it raised RuntimeError",
        ),
        (
            [f"zoo.models.1.model={__name__}:Downsampler", "zoo.models.1.params={}"],
            r"zoo\.models\.1 \('big'\): Expected logits of shape \[1, 3, 4, 4\] .* but got \[1, 3, 2, 2\]",
        ),
    ],
)
def test_zoo_that_disagrees_with_the_data(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_experiment(_experiment_cfg(*overrides), _bundle())


def test_classifier_zoo_is_checked_for_k_logits() -> None:
    models = [
        {"name": "small", "model": "toy_classifier", "params": {"in_features": 64}},
        {"name": "big", "model": "toy_classifier", "params": {"in_features": 64, "num_classes": 4}},
    ]
    cfg = _experiment_cfg("partitioner.name=whole_input", "partitioner.params={}", models=models)
    with pytest.raises(ConfigError, match=r"zoo\.models\.1 \('big'\): Expected logits of shape \[1, 3\] .* but got \[1, 4\]"):
        build_experiment(cfg, _bundle(dense=False))
    models[1]["params"] = {"in_features": 64}
    assert build_experiment(
        _experiment_cfg("partitioner.name=whole_input", "partitioner.params={}", models=models), _bundle(dense=False)
    )


def test_shape_check_draws_no_random_numbers_and_keeps_modes() -> None:
    cfg = _experiment_cfg()
    zoo = build_zoo(cfg, in_channels=1, num_classes=3)
    zoo[0].eval()
    data = _bundle()
    state = torch.get_rng_state()
    check_zoo_outputs(cfg, zoo, PatchGrid(2, 2), (1, 8, 8), data)
    assert torch.equal(torch.get_rng_state(), state)
    assert not zoo[0].training and zoo[1].training


def test_too_few_training_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data \(.*\): Expected at least 3 training samples .* but got 2"):
        build_experiment(_experiment_cfg(), _bundle(num_train=2))


def test_expert_key_missing_from_the_data() -> None:
    meta = {"noise": torch.zeros(6, dtype=torch.long), "fineness": torch.zeros(6)}
    with pytest.raises(
        ConfigError,
        match=r"evaluation\.expert_key: Expected a meta key of the data's test split \(it has: fineness, noise\) but got 'nose'",
    ):
        build_experiment(_experiment_cfg("evaluation.expert_key=nose"), _bundle(meta=meta))
    with pytest.raises(ConfigError, match=r"evaluation\.expert_key: .*\(it has: none\) but got 'noise'"):
        build_experiment(_experiment_cfg("evaluation.expert_key=noise"), _bundle())
    assert build_experiment(_experiment_cfg("evaluation.expert_key=noise"), _bundle(meta=meta)).config.evaluation.expert_key


def test_train_on_key_missing_from_the_data() -> None:
    with pytest.raises(ConfigError, match=r"zoo\.models\.1\.train_on: Expected a meta key of the data .* but got 'noise'"):
        build_experiment(_experiment_cfg("zoo.models.1.train_on={noise: 1}"), _bundle())


@pytest.mark.parametrize(
    "override",
    [
        "zoo.models.1.model=nopkg.mod:Net",
        "router.name=nopkg.mod:Router",
        "uncertainty.name=nopkg.mod:Estimator",
        "cost.name=nopkg:Cost",
        "partitioner.name=routerkit.partitioners:NoSuchGrid",
    ],
)
def test_dotted_path_to_a_missing_module_is_a_config_error(override: str) -> None:
    field = override.partition("=")[0].rsplit(".", 1)[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}.*(nopkg|NoSuchGrid)"):
        build_experiment(_experiment_cfg(override), _bundle())


def test_missing_data_factory_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.factory: Could not import module 'my_plugin\.data'"):
        build_experiment(_experiment_cfg())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "router.params.widht=3",
            r"router\.params: Expected keyword arguments of PaSeRRouter among .*width.* but got unknown 'widht'",
        ),
        ("router.params.num_actions=3", r"router\.params: Expected no num_actions"),
        ("uncertainty.params.passes=3", r"uncertainty\.params: .*among .* but got unknown 'passes'"),
        ("cost.params.x=1", r"cost\.params: .*among base_cost but got unknown 'x'"),
        ("partitioner.params.row=3", r"partitioner\.params: .*among rows, cols, halo but got unknown 'row'"),
    ],
)
def test_component_params_checked_against_the_signature(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_experiment(_experiment_cfg(override), _bundle())


def test_check_params_skips_kwargs_and_names_required_arguments() -> None:
    def open_factory(width: int = 1, **kwargs: Any) -> None: ...

    def needs_root(root: str, size: int = 4) -> None: ...

    check_params("data.params", open_factory, {"anything": 1})
    check_params("data.params", needs_root, {"root": "/data"})
    with pytest.raises(ConfigError, match=r"data\.params: Expected a value for root \(required by .*needs_root\) but got none"):
        check_params("data.params", needs_root, {"size": 2})
    with pytest.raises(ConfigError, match=r"data\.params: Expected keyword arguments of .*needs_root among root, size"):
        check_params("data.params", needs_root, {"root": "/data", "sise": 2})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_not_available() -> None:
    with pytest.raises(ConfigError, match="no CUDA device is available here"):
        check_device("cuda")
    assert check_device("cpu") == torch.device("cpu")


def test_config_problems_without_data() -> None:
    assert config_problems(_experiment_cfg(), data_factory=False) == []
    problems = config_problems(
        _experiment_cfg("zoo.models.1.model=nopkg.mod:Net", "router.params.widht=3", "zoo.models.0.params.width=-2"),
        data_factory=False,
    )
    assert [p.split(":")[0] for p in problems] == ["router.params", "zoo.models.0 ('small')", "zoo.models.1.model"]
    assert "Expected 'toy_segmenter' to build with zoo.models.0.params {'width': -2} but it raised" in problems[1]
