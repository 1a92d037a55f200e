"""Experiment configuration: YAML -> validated `ExperimentConfig` -> built objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from routerkit.config.schema import CONFIG_DIR, ExperimentConfig, ServeConfig

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_serve_config",
    "merge_serve_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the field and what was expected."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like 'section.key=value'.")
        path, _, text = item.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"Override {item!r} has an empty key.")
        node: Any = raw
        for key in keys[:-1]:
            if isinstance(node, list) and key.isdigit():
                if int(key) >= len(node):
                    raise ConfigError(f"Override {item!r}: index {key} is out of range (the list has {len(node)} items).")
                node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {key!r} is not a section.")
            if node.get(key) is None:  # an optional section left at null (e.g. serve.ray.ingress.autoscaling)
                node[key] = {}
            node = node[key]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"Override {item!r}: expected a YAML value after '=' but got {text!r} ({getattr(err, 'problem', None) or err})."
            ) from None
        if isinstance(node, list) and keys[-1].isdigit():
            if int(keys[-1]) >= len(node):
                raise ConfigError(f"Override {item!r}: index {keys[-1]} is out of range (the list has {len(node)} items).")
            node[int(keys[-1])] = value
        elif isinstance(node, dict):
            node[keys[-1]] = value
        else:
            raise ConfigError(f"Override {item!r}: cannot set {keys[-1]!r} inside a {type(node).__name__}.")
    return raw


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively; mapping keys keep their type (an int stays an int)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data that `parse_config` reads back to an equal config.

    Unlike ``model_dump(mode="json")``, mapping keys keep their types: a mask ``value_map`` of
    ``{0: 0, 128: 1}`` in ``data.params`` stays a map of ints, not of strings.
    """
    return _plain(cfg.model_dump(mode="python"))  # type: ignore[no-any-return]


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text (``config.yaml`` of a run directory); loads back to ``cfg``."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected(msg: str) -> str:
    """Pydantic's ``Input should be X`` as ``Expected X`` (``Expected a value less than 10``)."""
    if not msg.startswith("Input should be "):
        return msg + ","
    rest = msg.removeprefix("Input should be ")
    return "Expected " + ("a value " if rest.startswith(("less", "greater", "a multiple")) else "") + rest


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``field.path: message`` (cross-field rules name their field, see `schema.field_error`)."""
    lines = [f"Invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "config_field":
            loc = str(e.get("ctx", {}).get("field", loc))
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `routerkit validate --help` lists the sections)"
        elif e["type"] != "missing" and "but got" not in msg and not isinstance(e.get("input"), (dict, list)):
            msg = f"{_expected(msg)} but got {_short_repr(e.get('input'))}"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<dict>", config_dir: str | Path | None = None) -> ExperimentConfig:
    """Validate a raw mapping; raise `ConfigError` with readable messages.

    Args:
        raw: The config's sections.
        source: Names the config in messages.
        config_dir: The config file's folder: relative ``zoo.models[].weights`` paths are resolved
            against it (``None``: against the working directory).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"Config {source} must be a mapping of sections, got {type(raw).__name__}.")
    try:
        return ExperimentConfig.model_validate(raw, context={CONFIG_DIR: config_dir})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment YAML file.

    Relative ``zoo.models[].weights`` paths are resolved against the file's folder, those given in
    ``overrides`` against the working directory.

    Args:
        path: YAML file.
        overrides: ``key.sub=value`` strings applied before validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file {path}: expected UTF-8 text but got {_one_line(err)}.") from None
    except OSError as err:
        raise ConfigError(f"Config file {path} cannot be read: {err}.") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
    return parse_config(apply_overrides(raw, _cwd_weights(overrides or [])), str(path), config_dir=path.parent)


def _cwd_weights(overrides: list[str]) -> list[str]:
    """Overrides with relative ``zoo.models.N.weights=PATH`` made absolute against the working directory.

    A path typed on the command line is relative to where it is typed; one in the file, to the file.
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        plain = value.strip()
        if sep and len(parts) == 4 and parts[:2] == ["zoo", "models"] and parts[3] == "weights" and plain:
            expanded = os.path.expandvars(os.path.expanduser(plain))
            if plain.lower() not in ("null", "none", "~") and not os.path.isabs(expanded):
                item = f"{key}={Path.cwd() / expanded}"
        out.append(item)
    return out


def load_serve_config(path: str | Path, base: ServeConfig | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """The ``serve:`` section of a YAML file (a whole config, or a file holding only ``serve:``) over ``base``.

    Keys the file sets replace ``base``'s (sub-sections merged key by key); ``overrides``
    (``serve.key=value`` or ``key=value``) come last.

    Args:
        path: The YAML file.
        base: The settings it amends (default: `ServeConfig`'s defaults), e.g. the run's own ``serve:``.
        overrides: ``key.sub=value`` items (values parsed as YAML).

    Raises:
        ConfigError: The file is missing, not YAML, has no ``serve:`` mapping, or a setting is invalid
            (the message names the field, as ``serve.<field>``).
    """
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Serve config {file} does not exist.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"Serve config {file} is not readable YAML: {_one_line(err)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("serve"), dict):
        raise ConfigError(f"Serve config {file}: expected a mapping with a 'serve:' section (routerkit serve's settings).")
    return merge_serve_config(base or ServeConfig(), raw["serve"], str(file), overrides)


def merge_serve_config(
    base: ServeConfig, section: dict[str, Any], source: str, overrides: list[str] | None = None
) -> ServeConfig:
    """``base`` with a raw ``serve:`` mapping's keys and ``overrides`` applied, validated; errors name ``serve.<field>``."""

    def merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        for key, value in new.items():
            into[key] = merge(dict(into[key]), value) if isinstance(value, dict) and isinstance(into.get(key), dict) else value
        return into

    raw = merge(_plain(base.model_dump()), section)
    items = [item.removeprefix("serve.") for item in overrides or []]
    raw = apply_overrides(raw, items)
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        lines = format_validation_error(err, source).splitlines()[1:]
        named = [line if line.startswith("  - serve.") else line.replace("  - ", "  - serve.", 1) for line in lines]
        raise ConfigError("\n".join([f"Invalid serve settings ({source}):", *named])) from None
