"""Loading a task model's weights from a state dict file (``zoo.models[].weights``), with errors that name the problem.

Two formats are read:

- ``.safetensors`` (`safetensors.torch.load_file`): tensors only, nothing is executed;
- anything else is a torch file (``torch.save``), read with ``torch.load(weights_only=True)``: a pickle
  holding anything but tensors, containers and plain values is refused before any of its code runs.

A torch file may hold the state dict itself or a dict with a ``state_dict`` or ``model`` entry
holding it (the usual training checkpoints). Every problem is a `routerkit.config.ConfigError`
naming the config field, the file and what was expected: a missing or unreadable file, content that
is not a mapping of tensors, missing or unexpected keys, shapes that do not fit the model, NaN or inf.
``routerkit.config.build.build_zoo`` calls `load_weights_file` for every model whose config sets ``weights``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routerkit.config import ConfigError

__all__ = ["WRAPPER_KEYS", "check_state_dict", "load_weights_file", "read_state_dict"]

#: Keys of a torch checkpoint dict that hold the model's state dict (tried in this order).
WRAPPER_KEYS = ("state_dict", "model")
#: How many keys or tensors a message lists before "... (N in all)".
_SHOWN = 5


def _first(items: list[str], n: int = _SHOWN) -> str:
    """``'a', 'b', 'c'`` or ``'a', ..., 'e', ... (12 in all)``."""
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else f" ({len(items)} in all)")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _read(path: Path, where: str) -> Any:
    """The file's content: safetensors by suffix, else a torch file loaded with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
            raise ConfigError(
                f"{where}: Expected a readable safetensors file but got content safetensors cannot read ({_one_line(err)})."
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split()).split("Check the documentation")[0]
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is not None:  # weights_only refused an object before creating it: nothing ran
            raise ConfigError(
                f"{where}: Expected a torch file of tensors (a state dict) but got a pickle holding other objects "
                f"({found.group(1)}), which routerkit refuses to load because unpickling them could run code. Save the "
                "state dict itself: torch.save(model.state_dict(), path), or safetensors.torch.save_file(model.state_dict(), "
                "path)."
            ) from None
        reason = text.split("WeightsUnpickler error:")[-1].strip()[:200]
        raise ConfigError(
            f"{where}: Expected a torch file (torch.save) or a .safetensors file but got content torch.load cannot read "
            f"(UnpicklingError: {reason})."
        ) from None
    except Exception as err:  # a corrupt zip, a truncated file, ...
        raise ConfigError(
            f"{where}: Expected a torch file (torch.save) or a .safetensors file but got content torch.load cannot read "
            f"({_one_line(err)})."
        ) from None


def _unwrap(content: Any) -> Any:
    """The state dict inside a checkpoint dict (``state_dict`` / ``model`` entry), else ``content`` itself."""
    if isinstance(content, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping):
                return content[key]
    return content


def read_state_dict(path: str | Path, where: str = "weights") -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch file, refusing anything but a mapping of names to tensors.

    Args:
        path: The file.
        where: Names the source in messages, e.g. ``"zoo.models.1.weights (f1.pt)"``.

    Returns:
        The state dict (tensors on the CPU).

    Raises:
        ConfigError: When the file is missing, unreadable, a pickle of other objects, or not a
            mapping of names to tensors.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{where}: Expected a state dict file (.safetensors or a torch file) but {path} does not exist.")
    if not path.is_file():
        raise ConfigError(f"{where}: Expected a state dict file (.safetensors or a torch file) but {path} is not a file.")
    content = _unwrap(_read(path, where))
    expected = "a mapping of parameter names to tensors (a state dict"
    expected += f", or a dict with a {' or '.join(repr(k) for k in WRAPPER_KEYS)} entry holding one)"
    if not isinstance(content, Mapping):
        raise ConfigError(f"{where}: Expected {expected} but got a {type(content).__name__}.")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in content.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ConfigError(f"{where}: Expected {expected} but got entries that are not named tensors: {_first(bad)}.")
    return dict(content)


def _prefix_hint(expected: list[str], given: list[str]) -> str:
    """A hint when every given key is an expected one behind one common prefix (``module.`` of DataParallel, ``model.``)."""
    heads = {k.partition(".")[0] for k in given}
    if len(heads) != 1 or not all("." in k for k in given):
        return ""
    head = heads.pop()
    stripped = {k[len(head) + 1 :] for k in given}
    if stripped and stripped <= set(expected):
        return (
            f" Every key of the file starts with {head + '.'!r}: strip that prefix from the keys "
            f"({{k.removeprefix({head + '.'!r}): v for k, v in state.items()}}) and save it again."
        )
    return ""


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, label: str = "the model") -> None:
    """Raise unless ``state`` loads into ``model`` as is: same keys, same shapes, finite values.

    Args:
        model: The module the state is for.
        state: A mapping of names to tensors (`read_state_dict`).
        where: Names the source in messages.
        label: Names the model in messages, e.g. ``"model 'f1' (UNet)"``.

    Raises:
        ConfigError: Listing the first missing and unexpected keys (and how many in all), the keys
            of another shape (expected and got), or the tensors holding NaN or inf.
    """
    from torch.nn.parameter import is_lazy

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = [f"missing keys {_first([repr(k) for k in missing])}"] if missing else []
        what += [f"unexpected keys {_first([repr(k) for k in unexpected])}"] if unexpected else []
        raise ConfigError(
            f"{where}: Expected the state dict of {label} ({len(own)} tensors) but got "
            + "; ".join(what)
            + "."
            + _prefix_hint(list(own), list(state))
        )
    shapes = [
        f"{k!r}: expected {list(v.shape)} but got {list(state[k].shape)}"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and not is_lazy(v) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise ConfigError(
            f"{where}: Expected tensors of the shapes of {label} but got other shapes for {_first(shapes, 3)}; "
            "were the weights saved from a model with other params (width, channels, classes)?"
        )
    bad = [repr(k) for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"{where}: Expected finite weights but got NaN or inf in {_first(bad)}.")


def load_weights_file(model: nn.Module, path: str | Path, field: str = "weights", label: str | None = None) -> None:
    """Load a state dict file into ``model``, after checking it fits (keys, shapes, finite values).

    Args:
        model: The module to load into (its weights are unchanged when anything is refused).
        path: A ``.safetensors`` file or a torch file (see the module docstring).
        field: The config field that names the file, for messages (``zoo.models.1.weights``).
        label: Names the model in messages (default: its class).

    Raises:
        ConfigError: Naming ``field``, the file and what was expected.
    """
    where = f"{field} ({path})"
    state = read_state_dict(path, where)
    check_state_dict(model, state, where, label or f"the model ({type(model).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as err:  # a module's own load hook refused it
        raise ConfigError(f"{where}: Expected weights {type(model).__name__} can load but got {_one_line(err)}.") from None
