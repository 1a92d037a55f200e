"""A trained run as one module that routes new inputs: `load` and `RoutedModel.predict`.

Example:
    >>> import routerkit  # doctest: +SKIP
    >>> model = routerkit.load("runs/battery")  # doctest: +SKIP
    >>> result = model.predict(["scan_01.png", "scan_02.tif"])  # doctest: +SKIP
    >>> result.pred[0].shape, result.model_names, result.gflops  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from routerkit.data.spec import DataSpec
from routerkit.deploy.inputs import Input, as_inputs, pad_value
from routerkit.deploy.tiling import Tiling
from routerkit.functional import class_argmax
from routerkit.metrics import seeded_rng
from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router

__all__ = ["Prediction", "RoutedModel", "load"]


@dataclass
class Prediction:
    """What `RoutedModel.predict` returns for B inputs.

    Per-input fields are stacked tensors when every input has the trained shape, else lists with
    one tensor per input (inputs of other sizes are tiled into windows of the trained shape).

    Attributes:
        names: Each input's file path, or ``input N``.
        pred: Class ids: masks ``[B, H, W]`` (segmentation) or labels ``[B]`` (classification).
        actions: The model index chosen for each unit, ``[B, P]`` (P units over all of an input's windows, row-major per window).
        gflops: ``[B]`` GFLOPs spent per input, counting every pass that ran (fvcore convention:
            one multiply-add = one flop): ``f_0``'s state, the router, the chosen models, per window.
        windows: Windows of the trained shape each input took (1 for the trained size).
        model_names: Name of each model index.
        class_names: Name of each class id.
        routing_map: Segmentation: the chosen model per unit laid out over the input, ``[B, R, C]``
            unit rows and columns; ``None`` for classification.
        probs: Class probabilities ``[B, K, ...]`` when asked for (``predict(..., probs=True)``).
        uncertainty: ``f_0``'s uncertainty map ``[B, H, W]`` (segmentation; ``[B]`` classification), the
            state the router saw, when asked for (``predict(..., uncertainty=True)``); zeros where ``f_0`` does not run.
    """

    names: list[str]
    pred: Tensor | list[Tensor]
    actions: Tensor | list[Tensor]
    gflops: Tensor
    windows: list[int]
    model_names: list[str]
    class_names: list[str]
    routing_map: Tensor | list[Tensor] | None = None
    probs: Tensor | list[Tensor] | None = None
    uncertainty: Tensor | list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def usage(self) -> Tensor:
        """``[B, m + 1]`` share of each input's units answered by each model.

        Segmentation counts the units of `routing_map`, i.e. those that cover the input (the
        padding of a tiled input's last windows is not counted; its FLOPs are, in `gflops`).
        """
        source = self.routing_map if self.routing_map is not None else self.actions
        acts = source if isinstance(source, list) else list(source)
        m = len(self.model_names)
        return torch.stack([torch.bincount(a.flatten(), minlength=m).double() / a.numel() for a in acts])


@dataclass
class _Pending:
    """One input's windows on their way through the batches."""

    item: Input
    tiling: Tiling | None
    start: int
    count: int
    probs: list[Tensor] = field(default_factory=list)


class RoutedModel(nn.Module):
    """A trained router and its zoo, in eval mode, routing new inputs under ``torch.inference_mode``.

    Built by `load` from a run directory; ``forward(x)`` routes a batch of the trained shape and
    returns its stitched probabilities, `predict` takes files, arrays, PIL images or tensors of any
    size.

    Args:
        pipeline: The routed pipeline with the trained zoo (an inference copy is made: batch norms folded).
        router: The trained router (must not need labels).
        spec: The run's data spec.
        seed: Seed of the MC-dropout state, drawn afresh for every batch of `predict` so that the
            same call gives the same answer (``None``: the global generator's state).
        fold_bn: Fold batch norms into convolutions for inference (same outputs up to rounding, faster).
        mask_seed: Fix ``f_0``'s MC-dropout masks, drawn once from this seed
            (`routerkit.deploy.masks.fix_mc_masks`): a deterministic state, the one an ONNX export
            with the same seed bakes in (``None``: fresh masks per batch, seeded by ``seed``).

    Raises:
        ValueError: The router needs labels (the oracle) and cannot route new inputs.
    """

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: Router,
        spec: DataSpec,
        seed: int | None = 0,
        fold_bn: bool = True,
        mask_seed: int | None = None,
    ) -> None:
        super().__init__()
        if router.needs_targets:
            raise ValueError(f"Expected a router that decides without labels but got {type(router).__name__}, which needs them.")
        pipeline.zoo.eval()
        self.pipeline = pipeline.for_inference(fold_bn=fold_bn)
        self.zoo = self.pipeline.zoo
        self.router = router.eval()
        self.spec = spec
        self.seed = seed
        self._pad = pad_value(spec)
        self.mask_seed = mask_seed
        if mask_seed is not None:
            from routerkit.deploy.masks import fix_mc_masks

            fix_mc_masks(self.pipeline, self.router, mask_seed)
        self.eval()

    @property
    def model_names(self) -> list[str]:
        """Name of each model index (``f_0`` first)."""
        return list(self.zoo.names)

    @property
    def device(self) -> torch.device:
        """Where the models are."""
        first = next(self.zoo.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> RoutedModel:
        """Stays in eval mode: a routed model is for inference (train through `routerkit train`)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Stitched class probabilities ``[B, K, ...]`` of a batch ``x [B, *input_shape]`` of the trained shape."""
        return self.pipeline.route(x.to(self.device), self.router).probs

    def predict(self, inputs: Any, batch_size: int = 32, probs: bool = False, uncertainty: bool = False) -> Prediction:
        """Route inputs of any size end to end.

        Args:
            inputs: A tensor ``[B, C, H, W]`` or ``[C, H, W]`` (model space), a numpy array, a PIL
                image, a file path (PNG, TIFF, JPEG, 8 or 16-bit, ``.npy``; read with the run's
                normalisation), or a list of them.
            batch_size: Windows routed together.
            probs: Also return the class probabilities.
            uncertainty: Also return ``f_0``'s uncertainty map (stitched like the probabilities).

        Returns:
            The `Prediction`.

        Raises:
            ValueError: An input that cannot be read or does not fit the run (channels, rank,
                a classification input of another size); the message names it.
            TypeError: An input of an unsupported type.
        """
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1 but got {batch_size}.")
        items = as_inputs(inputs, self.spec)
        pending, windows = self._plan(items)
        flops = torch.zeros(len(windows), dtype=torch.float64)
        actions, all_probs, all_unc = [], [], []
        for b, start in enumerate(range(0, len(windows), batch_size)):
            x = torch.stack(windows[start : start + batch_size]).to(self.device)
            with seeded_rng(self.seed + b, self.device) if self.seed is not None else _nothing():
                out = self.pipeline.route(x, self.router)
            flops[start : start + x.shape[0]] = out.flops.double().cpu()
            actions.append(out.actions.cpu())
            all_probs.append(out.probs.float().cpu())
            if uncertainty:
                all_unc.append(out.base.uncertainty.float().cpu())
        unc = torch.cat(all_unc) if uncertainty else None
        return self._assemble(pending, torch.cat(actions), torch.cat(all_probs), flops, probs, unc)

    def _plan(self, items: list[Input]) -> tuple[list[_Pending], list[Tensor]]:
        shape = self.spec.input_shape
        pending: list[_Pending] = []
        windows: list[Tensor] = []
        for item in items:
            x = item.tensor
            if tuple(x.shape) == shape:
                pending.append(_Pending(item, None, len(windows), 1))
                windows.append(x)
                continue
            if not self.spec.spatial:
                raise ValueError(
                    f"{item.name}: expected an input of the trained shape {list(shape)} but got {list(x.shape)}; "
                    "only segmentation runs tile inputs of other sizes (resize it first)."
                )
            tiling = Tiling.plan(shape, tuple(x.shape))
            pending.append(_Pending(item, tiling, len(windows), tiling.num_windows))
            windows.extend(tiling.split(x, self._pad))
        return pending, windows

    def _assemble(
        self, pending: list[_Pending], actions: Tensor, probs: Tensor, flops: Tensor, keep_probs: bool, unc: Tensor | None = None
    ) -> Prediction:
        grid = self.pipeline.partitioner.grid_shape
        preds, acts, maps, kept, gflops, uncs = [], [], [], [], [], []
        for p in pending:
            sl = slice(p.start, p.start + p.count)
            a, pr = actions[sl], probs[sl]
            if p.tiling is None:
                full = pr[0]
                unit_map = a[0].reshape(grid) if self.spec.spatial else None
            else:
                full = p.tiling.stitch(pr)
                unit_map = p.tiling.stitch(a.reshape(p.count, 1, *grid).float())[0].round().long()
            preds.append(class_argmax(full, 0))
            acts.append(a.flatten() if p.tiling is not None else a[0])
            maps.append(unit_map)
            kept.append(full)
            gflops.append(float(flops[sl].sum()) / 1e9)
            if unc is not None:
                uncs.append(unc[sl][0] if p.tiling is None else p.tiling.stitch(unc[sl].unsqueeze(1))[0])
        same = all(p.tiling is None for p in pending)

        def pack(values: list[Tensor]) -> Tensor | list[Tensor]:
            return torch.stack(values) if same else values

        routing = pack([m for m in maps if m is not None]) if self.spec.spatial else None
        return Prediction(
            names=[p.item.name for p in pending],
            pred=pack(preds),
            actions=pack(acts),
            gflops=torch.tensor(gflops, dtype=torch.float64),
            windows=[p.count for p in pending],
            model_names=self.model_names,
            class_names=list(self.spec.class_names),
            routing_map=routing,
            probs=pack(kept) if keep_probs else None,
            uncertainty=pack(uncs) if unc is not None else None,
        )


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def load(
    run_dir: str | Path,
    checkpoint: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    seed: int | None = 0,
    mask_seed: int | None = None,
    fold_bn: bool = True,
) -> RoutedModel:
    """A trained run as a `RoutedModel`, without its training data.

    Reads the run's ``config.yaml``, ``data_spec.json`` and a checkpoint; imports none of the run's
    plugin code unless the run was created here or ``trust_remote_code`` is set
    (`routerkit.training.trust`).

    Args:
        run_dir: The run directory (``routerkit train`` wrote it).
        checkpoint: Checkpoint name, e.g. ``"calibrated"``; default: ``final``, else the latest.
        device: ``"cpu"``, ``"cuda"``...; default: the run's device if this machine has it, else the CPU.
        trust_remote_code: Import the plugin code the run names even if it comes from elsewhere.
        seed: Seed of the MC-dropout state per batch (`RoutedModel`).
        mask_seed: Fixed MC-dropout masks drawn once from this seed (`RoutedModel`; what ``routerkit export`` bakes in).
        fold_bn: Fold batch norms into convolutions (``False`` keeps the trained modules as they are,
            e.g. to save their state dicts).

    Raises:
        ConfigError: Not a run directory, an unknown checkpoint, or a config / data spec that does not build.
        UntrustedRunError: The run names code beyond routerkit and is not trusted.
        CheckpointError: The weights do not fit the models.

    Example:
        >>> model = load("runs/battery")  # doctest: +SKIP
        >>> model.predict("scan.png").pred.shape  # doctest: +SKIP
        torch.Size([1, 112, 128])
    """
    from routerkit.training.run_dir import load_routing

    parts = load_routing(run_dir, checkpoint, trust_remote_code, device)
    return RoutedModel(parts.pipeline, parts.router, parts.spec, seed=seed, fold_bn=fold_bn, mask_seed=mask_seed)
