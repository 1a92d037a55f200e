"""Preparing task models for inference: batch norm folded into convolutions, channels-last, ``torch.compile``.

Each function works on a **copy**: the model that trains is never changed. What the copies
compute equals the original in eval mode (up to float rounding), dropout layers included, so
Monte-Carlo dropout still works on them; `routerkit.RoutedPipeline.for_inference` applies them
to a whole zoo.

Example:
    >>> import torch
    >>> from routerkit.models import UNet
    >>> net = UNet(1, 3, base_channels=4, depth=2, dropout=0.1).eval()
    >>> fast = prepare_for_inference(net)
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    0
    >>> x = torch.rand(2, 1, 28, 32)
    >>> bool(torch.allclose(fast(x), net(x), atol=1e-5))
    True
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["check_compile", "compile_model", "fold_batch_norm", "prepare_for_inference"]

M = TypeVar("M", bound=nn.Module)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward, each direct child a single call (so its data flow shows)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name


def _foldable_conv(module: nn.Module) -> bool:
    # A transposed convolution's weight is [in, out / groups, ...]: the per-output scale only lines up for groups == 1.
    return isinstance(module, _CONVS) or (isinstance(module, _TRANSPOSED) and module.groups == 1)


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """``(conv, norm)`` names of direct children of ``parent`` where the norm reads the convolution's output only.

    Found by tracing ``parent.forward`` with torch.fx (children as leaves): a pair qualifies when
    each of the two is called exactly once, the norm's only input is the convolution's output,
    nothing else reads that output, and neither module's tensors are used directly. A module
    that cannot be traced (data-dependent control flow) contributes no pair.
    """
    children = dict(parent.named_children())
    if not any(_foldable_conv(c) for c in children.values()) or not any(isinstance(c, _NORMS) for c in children.values()):
        return []
    try:
        graph = _ChildrenAsLeaves().trace(parent)
    except Exception:  # any tracing failure only means: not folded here
        return []
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    attrs = {str(n.target).split(".")[0] for n in graph.nodes if n.op == "get_attr"}
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(children.get(str(node.target)), _NORMS) or node.kwargs:
            continue
        if len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        conv, norm = str(src.target), str(node.target)
        if src.op != "call_module" or not _foldable_conv(children.get(conv, nn.Identity())) or src.kwargs:
            continue
        if calls[conv] == 1 and calls[norm] == 1 and len(src.users) == 1 and not {conv, norm} & attrs:
            pairs.append((conv, norm))
    return pairs


@torch.no_grad()
def _fuse(conv: _ConvNd, norm: _BatchNorm) -> None:
    """Fold ``norm``'s running statistics and affine map into ``conv``'s weight and bias, in place."""
    assert norm.running_mean is not None and norm.running_var is not None
    weight, bias = fuse_conv_bn_weights(
        conv.weight,
        conv.bias,
        norm.running_mean,
        norm.running_var,
        norm.eps,
        norm.weight,
        norm.bias,
        transpose=isinstance(conv, _TRANSPOSED),
    )
    conv.weight, conv.bias = weight, bias


def fold_batch_norm(module: M) -> M:
    """A deep copy of ``module`` with every eval-mode batch norm that follows a convolution folded into it.

    The convolution takes the norm's scale and shift (``torch.nn.utils.fusion.fuse_conv_bn_weights``;
    it gains a bias if it had none) and the norm is replaced by ``nn.Identity``, so the copy
    computes the same as ``module`` in eval mode with one pass over the activations fewer per
    norm. Pairs are found in every submodule's forward by tracing it with torch.fx, children as
    single calls: consecutive layers of an ``nn.Sequential`` (the UNet's double convolutions),
    attributes called in a custom forward (the CIFAR ResNet's ``bn1(conv1(x))``), any
    ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` (ungrouped) before a ``BatchNorm{1,2,3}d``.
    A pair is left alone when the convolution's output is read elsewhere too, when either
    module is shared or called twice, or when its parent cannot be traced. Dropout and every
    other layer stay as they are; ``module`` itself is not changed.

    Args:
        module: Any module, in eval mode where it should be folded: a batch norm in training
            mode normalises with the batch's statistics, which no weight can hold, so it is
            kept (with a warning saying how many).

    Returns:
        The folded copy, in the same train/eval mode as ``module``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> fold_batch_norm(net)
        Sequential(
          (0): Conv2d(1, 4, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
    """
    folded = copy.deepcopy(module)
    training = _fold_in_place(folded)
    if training:
        warnings.warn(
            f"fold_batch_norm kept {training} batch-norm layer(s) in training mode (they normalise with the "
            "batch's statistics); call .eval() on the model first to fold them.",
            UserWarning,
            stacklevel=2,
        )
    return folded


def _fold_in_place(module: nn.Module) -> int:
    """Fold every foldable pair of ``module`` in place; return how many norms were kept for being in training mode."""
    uses = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    training = 0
    for _, parent in list(module.named_modules()):
        for conv_name, norm_name in _conv_bn_pairs(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if uses[id(conv)] > 1 or uses[id(norm)] > 1 or norm.running_mean is None or norm.running_var is None:
                continue
            if norm.training:
                training += 1
                continue
            _fuse(conv, norm)
            setattr(parent, norm_name, nn.Identity())
    return training


def _probe(t: Tensor) -> Tensor:
    return torch.relu(t) * 2.0 + 1.0


@functools.cache
def _compile_problem(backend: str) -> str | None:
    """Why ``torch.compile`` with ``backend`` fails on a one-line function here, or ``None`` if it works (cached)."""
    try:
        torch.compile(_probe, backend=backend, fullgraph=True)(torch.ones(4))
    except Exception as err:  # reported to the caller as one clear error
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[0] if text else '(no message)'}"
    return None


def check_compile(backend: str = "inductor") -> None:
    """Raise a clear error if ``torch.compile`` does not work on this machine.

    Compiles and runs a one-line function once per process (a few seconds). Inductor's CPU
    backend writes C++ and needs a compiler (``g++`` or ``clang++``; ``CXX`` picks another).

    Args:
        backend: The ``torch.compile`` backend to check.

    Raises:
        RuntimeError: ``torch.compile`` failed, with torch's first line of the reason.
    """
    problem = _compile_problem(backend)
    if problem is not None:
        raise RuntimeError(
            f"torch.compile (backend {backend!r}) does not work here: {problem}. Inductor on a CPU needs a C++ "
            "compiler (install g++ or clang++, or set CXX); otherwise prepare the models with compile=False."
        )


class _Compiled(nn.Module):
    """``model`` with its forward compiled; fvcore's tracer (``torch.jit``) sees the eager model."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self._forward = torch.compile(model.forward, **options)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x) if torch.jit.is_tracing() else self._forward(x)
        return out


class _CompiledSplit(_Compiled):
    """`_Compiled` for a model with timm's split: `forward_features` and `forward_head` compiled too (shared trunk)."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        super().__init__(model, options)
        self._eager_features: Callable[[Tensor], Tensor] = model.forward_features  # type: ignore[assignment]
        self._eager_head: Callable[[Tensor], Tensor] = model.forward_head  # type: ignore[assignment]
        self._features = torch.compile(self._eager_features, **options)
        self._head = torch.compile(self._eager_head, **options)

    def forward_features(self, x: Tensor) -> Tensor:
        out: Tensor = self._eager_features(x) if torch.jit.is_tracing() else self._features(x)
        return out

    def forward_head(self, features: Tensor) -> Tensor:
        out: Tensor = self._eager_head(features) if torch.jit.is_tracing() else self._head(features)
        return out


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` wrapped with its forward compiled by ``torch.compile`` (and its trunk and head, if it has timm's split).

    The wrapper holds ``model`` itself (parameters shared, not copied). FLOP counting traces the
    eager model, which computes the same. The first call for each input shape compiles (tens
    of seconds on a CPU); a second batch size makes torch recompile once for any size, which
    ``dynamic=True`` avoids.

    Args:
        model: The module to compile.
        **options: Keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        The wrapper, with ``forward_features`` / ``forward_head`` when ``model`` has both.

    Raises:
        RuntimeError: ``torch.compile`` does not work here (`check_compile`).
    """
    check_compile(str(options.get("backend", "inductor")))
    split = callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
    return (_CompiledSplit if split else _Compiled)(model, options)


def prepare_for_inference(
    model: nn.Module,
    fold_bn: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
) -> nn.Module:
    """An eval-mode copy of ``model`` made faster for inference; ``model`` is not changed.

    Args:
        model: A task model.
        fold_bn: Fold batch norms into the convolutions before them (`fold_batch_norm`).
        channels_last: Store 4-D weights channels-last (``NHWC``); convolutions then produce
            channels-last activations whatever the input's layout, which oneDNN runs faster on CPUs.
        compile: Wrap the copy with ``torch.compile`` (`compile_model`).
        compile_options: Keyword arguments of ``torch.compile``.

    Returns:
        The prepared copy, in eval mode.

    Raises:
        RuntimeError: ``compile=True`` but ``torch.compile`` does not work here.
    """
    if compile:
        check_compile(str((compile_options or {}).get("backend", "inductor")))  # fail before copying anything
    prepared = copy.deepcopy(model).eval()
    if fold_bn:
        _fold_in_place(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if compile:
        prepared = compile_model(prepared, **(compile_options or {}))
    return prepared.eval()
