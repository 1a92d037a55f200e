"""Route new inputs with a trained run: `load` a run as a `RoutedModel` and `RoutedModel.predict`.

Example:
    >>> import routerkit  # doctest: +SKIP
    >>> model = routerkit.load("runs/battery")  # doctest: +SKIP
    >>> out = model.predict("scan.png")  # doctest: +SKIP
    >>> out.pred.shape, out.usage()  # doctest: +SKIP
"""

from __future__ import annotations

from routerkit.deploy.model import Prediction, RoutedModel, load
from routerkit.deploy.tiling import Tiling

__all__ = ["Prediction", "RoutedModel", "Tiling", "load"]
