"""Griffe extensions used by the documentation build (not part of routerkit).

``NamespaceSubpackages``: Griffe, which mkdocstrings uses to read the sources, skips sub-folders of a regular package
that have no ``__init__.py`` (PEP 420 namespace subpackages). Python imports them fine, so
``routerkit.training`` works at run time but would be missing from the API reference. This
extension loads such folders as modules of the package. It does nothing for folders that have
an ``__init__.py``, so it becomes a no-op once every subpackage has one.

``SphinxRoles``: a few docstrings use Sphinx roles (``:class:`Zoo` ``), which Markdown would
show literally; they are rendered as inline code instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe


class NamespaceSubpackages(griffe.Extension):
    """Attach ``__init__``-less sub-folders of a loaded package as (namespace) modules."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        filepath = pkg.filepath
        if not isinstance(filepath, Path) or filepath.name != "__init__.py":
            return
        self._attach(pkg, filepath.parent, loader)

    def _attach(self, module: griffe.Module, folder: Path, loader: griffe.GriffeLoader) -> None:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if sub.name in module.members or not sub.name.isidentifier():
                continue
            if (sub / "__init__.py").exists() or not any(sub.glob("*.py")):
                continue
            namespace = griffe.Module(
                sub.name,
                filepath=[sub],
                parent=module,
                lines_collection=loader.lines_collection,
                modules_collection=loader.modules_collection,
            )
            module.set_member(sub.name, namespace)
            for py in sorted(sub.glob("*.py")):
                if not py.stem.isidentifier():
                    continue
                try:
                    child = loader._load_module(py.stem, py, submodules=False, parent=namespace)
                except griffe.LoadingError:
                    continue
                namespace.set_member(py.stem, child)
            self._attach(namespace, sub, loader)


_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|obj|exc):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Render Sphinx cross-reference roles in docstrings as inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
