"""Name -> factory registries with friendly errors, shared by every component family.

A registry maps a short name (``"paser"``) to a class or factory. Components can be
given as a registered name, a dotted path to user code (``"mypkg.zoo:build"``), a
class/factory, or a ready instance; `Registry.resolve` accepts all four.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised when a name is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


def import_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` (or ``"package.module.attribute"``).

    Args:
        path: Dotted path with an optional ``:`` before the attribute name.

    Returns:
        The imported attribute.

    Raises:
        ImportError: When the module or attribute cannot be found; the message says which.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"Expected a dotted path like 'package.module:attribute' but got {path!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"Could not import module {module_name!r} from {path!r}: {err}. "
            "Is the package installed or its folder on PYTHONPATH? Plugin folders next to a "
            "config file are added automatically by the routerkit CLI."
        ) from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"Module {module_name!r} has no attribute {attr!r} (from {path!r}).")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A named collection of factories for one component family.

    Args:
        kind: Human-readable family name used in error messages (``"router"``).
        base: Optional base class; instances of it are passed through by `resolve`.

    Example:
        >>> routers = Registry("router")
        >>> @routers.register("always_zero")
        ... class AlwaysZero: ...
        >>> routers.names()
        ['always_zero']
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a class or factory under ``name`` (overwriting warns)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"Expected a non-empty string name for a {self.kind} but got {name!r}.")

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not obj:
                warnings.warn(
                    f"Overwriting {self.kind} {name!r} ({self._entries[name]!r} -> {obj!r}).",
                    stacklevel=2,
                )
            self._entries[name] = obj
            return obj

        return decorator

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
        names = sorted(self._entries)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for ``name`` or a dotted path; raise a helpful error otherwise."""
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            obj: Callable[..., T] = import_object(name)
            return obj
        close = difflib.get_close_matches(name, self._entries, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(
            f"Unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(self.names()) or '(none)'}; "
            "or give a dotted path 'package.module:factory'."
        )

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered as ``name`` with ``kwargs``."""
        factory = self.get(name)
        try:
            return factory(**kwargs)
        except TypeError as err:
            raise TypeError(f"Could not build {self.kind} {name!r} with arguments {sorted(kwargs)}: {err}") from err

    def resolve(self, spec: Any, **kwargs: Any) -> T:
        """Accept a name, a dotted path, a class/factory or an instance and return an instance."""
        if isinstance(spec, str):
            return self.create(spec, **kwargs)
        if self.base is not None and isinstance(spec, self.base):
            if kwargs:
                raise ValueError(f"Got a ready {self.kind} instance and extra arguments {sorted(kwargs)}.")
            return cast(T, spec)
        if isinstance(spec, type) or callable(spec):
            result: T = spec(**kwargs)
            return result
        if self.base is None:
            return cast(T, spec)
        raise TypeError(f"Expected a {self.kind} name, class or instance of {self.base.__name__} but got {type(spec).__name__}.")
