"""What a run saves of its models, and loading it back with checks that name what does not fit.

A checkpoint's ``model`` entry is `model_state` of the experiment: ``{"zoo": state dict, "router":
state dict}``. `load_model_state` refuses a state that does not fit the zoo and router rebuilt from
the run's ``config.yaml`` (missing or unexpected keys, other shapes) or holds NaN / inf weights.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from routerkit.models import Zoo
from routerkit.routers.base import Router
from routerkit.training.checkpoint import CheckpointError

__all__ = ["HasModels", "load_model_state", "model_state"]


class HasModels(Protocol):
    """What holds a run's weights: an `Experiment`, or the zoo and router `routerkit.load` rebuilds."""

    @property
    def zoo(self) -> Zoo: ...

    @property
    def router(self) -> Router: ...


def model_state(exp: HasModels) -> dict[str, Any]:
    """The ``model`` entry of a checkpoint: ``{"zoo": zoo state dict, "router": router state dict}``."""
    return {"zoo": exp.zoo.state_dict(), "router": exp.router.state_dict()}


def load_model_state(exp: HasModels, state: Any, checkpoint: str = "the checkpoint") -> None:
    """Load a checkpoint's ``model`` entry into the zoo and the router built from the run's config.

    Args:
        exp: The experiment rebuilt from the run's ``config.yaml``.
        state: The checkpoint's ``model`` entry, ``{"zoo": state dict, "router": state dict}``.
        checkpoint: The checkpoint file, for the error messages.

    Raises:
        CheckpointError: When a state dict misses keys, has unexpected ones or a tensor of another
            shape than the module's (the message names the checkpoint, the zoo model or the router
            and the keys), or when a floating-point tensor holds NaN or inf (it names the tensors).
    """
    modules: dict[str, torch.nn.Module] = {"zoo": exp.zoo, "router": exp.router}
    if not isinstance(state, dict) or not all(isinstance(state.get(part), dict) for part in modules):
        got = f"keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"Checkpoint {checkpoint}: expected a model state with 'zoo' and 'router' state dicts but got {got}."
        )
    problems = [p for part, module in modules.items() for p in _state_mismatches(exp, part, module, state[part])]
    if problems:
        raise CheckpointError(
            f"Checkpoint {checkpoint} does not fit the models built from the run's config.yaml: "
            + "; ".join(problems)
            + ". Was config.yaml edited after training, or the checkpoint taken from another run?"
        )
    bad = [name for part, module in modules.items() for name in _non_finite(exp, part, module, state[part])]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"Checkpoint {checkpoint}: expected finite weights but got NaN or inf in {len(bad)} tensor(s): {shown}. "
            "The training diverged or the file was overwritten; resume from an earlier checkpoint or retrain."
        )
    for part, module in modules.items():
        try:
            module.load_state_dict(state[part])
        except RuntimeError as err:  # a module's own load hook refused it
            raise CheckpointError(f"Checkpoint {checkpoint}: loading the {part} state failed: {err}") from None


def _module_label(exp: HasModels, part: str, key: str) -> str:
    """``zoo model 'f1_medium'`` for a zoo key ``members.1.<...>``, ``router (PaSeRRouter)`` for the router's."""
    if part != "zoo":
        return f"router ({type(exp.router).__name__})"
    head, _, rest = key.partition(".")
    index = rest.partition(".")[0]
    if head == "members" and index.isdigit() and int(index) < len(exp.zoo.names):
        return f"zoo model {exp.zoo.names[int(index)]!r}"
    return "zoo"


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _state_mismatches(exp: HasModels, part: str, module: torch.nn.Module, given: dict[str, Any]) -> list[str]:
    """What keeps ``given`` from loading into ``module``, one line per zoo model (or the router)."""
    from torch.nn.parameter import is_lazy

    expected = module.state_dict()
    found: dict[str, list[list[str]]] = {}  # label -> [missing, unexpected, wrong shapes]

    def note(key: str, kind: int, text: str) -> None:
        found.setdefault(_module_label(exp, part, key), [[], [], []])[kind].append(text)

    optional = module.optional_state_keys() if isinstance(module, Router) else set()
    for key, value in expected.items():
        got = given.get(key)
        if key not in given:
            if key not in optional:  # a key the module's own load hook fills in is not missing
                note(key, 0, repr(key))
        elif isinstance(value, torch.Tensor) and not is_lazy(value):
            if not isinstance(got, torch.Tensor):
                note(key, 2, f"expected {key!r} to be a tensor but got {type(got).__name__}")
            elif got.shape != value.shape:
                note(key, 2, f"expected {key!r} of shape {list(value.shape)} but got {list(got.shape)}")
    for key in given:
        if key not in expected:
            note(key, 1, repr(key))
    lines = []
    for label, (missing, unexpected, shapes) in found.items():
        what = [f"missing keys {_first(missing)}"] if missing else []
        what += [f"unexpected keys {_first(unexpected)}"] if unexpected else []
        what += [_first(shapes, 3)] if shapes else []
        lines.append(f"{label}: " + "; ".join(what))
    return lines


def _non_finite(exp: HasModels, part: str, module: torch.nn.Module, given: dict[str, Any]) -> list[str]:
    """Floating-point tensors of ``given`` holding NaN or inf (inf is allowed in router buffers: IDK's unfitted thresholds)."""
    parameters = {name for name, _ in module.named_parameters()}
    bad = []
    for key, value in given.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        inf_allowed = part == "router" and key not in parameters  # an IDK threshold of +inf: "never forward"
        broken = value.isnan().any() if inf_allowed else ~torch.isfinite(value).all()
        if bool(broken):
            bad.append(f"{_module_label(exp, part, key)} {key!r}")
    return bad
