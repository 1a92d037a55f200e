"""The routed inference pipeline: base model -> state -> router -> executor -> stitch -> FLOPs."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from routerkit._storage import RowStore
from routerkit.costs import CostModel
from routerkit.executor import Execution, Executor, FlopAccountant
from routerkit.functional import class_argmax, paid_counts
from routerkit.models import Zoo
from routerkit.partitioners import Partitioner
from routerkit.routers.base import Router, RouterSpec
from routerkit.uncertainty import BaseOutput, SoftmaxEntropy, UncertaintyEstimator


@dataclass
class RoutedOutput:
    """One routed batch.

    Attributes:
        probs: ``[B, K, ...]`` stitched probabilities.
        actions: ``[B, P]`` chosen model per unit.
        flops: ``[B]`` FLOPs spent per input (fvcore: one multiply-add = one flop).
        base: The base model's output the router saw.
        execution: Per-unit results (for training).
    """

    probs: Tensor
    actions: Tensor
    flops: Tensor
    base: BaseOutput
    execution: Execution

    @property
    def pred(self) -> Tensor:
        """Arg-max prediction ``[B, ...]``."""
        return class_argmax(self.probs, 1)


class RoutedPipeline:
    """Everything needed to route a batch, shared by every router.

    Args:
        zoo: Task models; ``zoo[0]`` is the base model ``f_0``.
        partitioner: Cuts inputs into units.
        estimator: Produces the router state from ``f_0``.
        cost_model: Normalised per-unit costs for rewards.
        input_shape: Shape of one input without batch (for FLOP accounting and unit shapes).
        max_units: Optional cap on units per model forward.
        inference_mode: Run `route` and `execute` under ``torch.inference_mode`` (no autograd
            records at all; the outputs cannot enter a backward pass). `for_inference` sets it.

    Example:
        >>> import torch
        >>> from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
        >>> from routerkit.models import ToySegmenter
        >>> zoo = Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=8)])
        >>> pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 8, 8))
        >>> router = create_router("random", num_actions=2, grid_shape=(2, 2))
        >>> out = pipe(torch.randn(3, 1, 8, 8), router)
        >>> out.probs.shape, out.actions.shape
        (torch.Size([3, 2, 8, 8]), torch.Size([3, 4]))
    """

    def __init__(
        self,
        zoo: Zoo,
        partitioner: Partitioner,
        estimator: UncertaintyEstimator | str,
        cost_model: CostModel | str,
        input_shape: tuple[int, ...],
        max_units: int | None = None,
        inference_mode: bool = False,
    ) -> None:
        from routerkit.costs import create_cost
        from routerkit.uncertainty import create_estimator

        self.zoo = zoo
        self.partitioner = partitioner
        self.estimator = create_estimator(estimator)
        self.cost_model = create_cost(cost_model)
        self.input_shape = tuple(input_shape)
        self.unit_shape = partitioner.unit_shape(self.input_shape)
        #: What a unit's model runs on: the unit with the partitioner's context margin (costs and FLOPs use it).
        self.model_unit_shape = partitioner.model_unit_shape(self.input_shape)
        self.executor = Executor(zoo, partitioner, max_units)
        self.accountant = FlopAccountant(zoo, partitioner, self.input_shape)
        self.inference_mode = inference_mode
        #: Where tables of per-input outputs of this pipeline (replay caches, distillation targets) are kept:
        #: in memory, or memory-mapped on disk above its budget (``run.cache_memory_gb``, ``run.cache_dir``).
        self.row_store = RowStore()
        self._costs: Tensor | None = None

    def for_inference(
        self,
        fold_bn: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> RoutedPipeline:
        """A new pipeline on inference copies of the zoo, whose `route` runs under ``torch.inference_mode``.

        Every model is copied in eval mode and prepared by `routerkit.inference.prepare_for_inference`;
        this pipeline, its models and their training are untouched. The copies compute the same
        outputs (up to float rounding) and keep their dropout layers, so MC-dropout states and
        hence routing decisions are those of this pipeline. Its FLOP accountant counts the copies,
        i.e. what runs: batch norms folded into convolutions are no longer charged.

        Args:
            fold_bn: Fold batch norms into the convolutions before them (`routerkit.inference.fold_batch_norm`).
            channels_last: Convolution weights channels-last (faster convolutions with oneDNN on CPUs).
            compile: Wrap each model with ``torch.compile`` (opt-in: needs a C++ compiler for
                inductor on CPUs, and each new input shape compiles first, tens of seconds).
            compile_options: Keyword arguments of ``torch.compile`` (``mode``, ``dynamic``, ...).

        Returns:
            The inference pipeline (same partitioner, cost model, input shape and unit cap; a copy of the estimator).

        Raises:
            RuntimeError: ``compile=True`` and ``torch.compile`` does not work here.

        Example:
            >>> import torch
            >>> from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
            >>> from routerkit.models import UNet
            >>> zoo = Zoo([UNet(1, 2, 2, 2, dropout=0.1, dropout_at="head"), UNet(1, 2, 8, 2)]).eval()
            >>> pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 16, 16))
            >>> fast = pipe.for_inference(channels_last=True)
            >>> router = create_router("random", num_actions=2, grid_shape=(2, 2))
            >>> fast(torch.rand(2, 1, 16, 16), router).probs.requires_grad
            False
        """
        from routerkit.inference import check_compile, prepare_for_inference

        if compile:
            check_compile(str((compile_options or {}).get("backend", "inductor")))
        models = {
            name: prepare_for_inference(model, fold_bn, channels_last, compile, compile_options)
            for name, model in zip(self.zoo.names, self.zoo, strict=True)
        }
        return RoutedPipeline(
            Zoo(models),
            self.partitioner,
            copy.deepcopy(self.estimator),
            self.cost_model,
            self.input_shape,
            self.executor.max_units,
            inference_mode=True,
        )

    def _grad_context(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.inference_mode()`` for an inference pipeline, else nothing (the caller's grad mode holds)."""
        return torch.inference_mode() if self.inference_mode else contextlib.nullcontext()

    @property
    def num_actions(self) -> int:
        """Models m + 1."""
        return len(self.zoo)

    @property
    def costs(self) -> Tensor:
        """``[m + 1]`` normalised unit costs from the cost model (cached)."""
        if self._costs is None:
            self._costs = self.cost_model.costs(self.zoo, self.model_unit_shape)
        return self._costs

    def _param_dtype(self) -> torch.dtype:
        """The floating-point dtype of the zoo's parameters (``torch.float32`` unless converted)."""
        for param in self.zoo.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.get_default_dtype()

    def check_input(self, x: Tensor, name: str = "images") -> None:
        """Raise a clear error if ``x`` is not a non-empty, finite batch of the configured shape and dtype.

        Args:
            x: ``[B, *input_shape]`` inputs, of the zoo's parameter dtype.
            name: What ``x`` is called in the message.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: Its shape, its dtype or its batch size (0) is wrong, or it holds NaN/inf
                (which would give NaN probabilities and every unit routed to ``f_0``).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"Expected {name} to be a torch.Tensor but got {type(x).__name__}.")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"Expected {name} of shape [B, {', '.join(map(str, self.input_shape))}] but got {list(x.shape)}.")
        dtype = self._param_dtype()
        if x.dtype != dtype:
            hint = "x.float()" if dtype == torch.float32 else f"x.to({dtype})"
            raise ValueError(f"Expected {name} of dtype {dtype} (the models' parameters) but got {x.dtype}; call {hint}.")
        if x.shape[0] == 0:
            raise ValueError(f"Expected a non-empty batch of {name} but got B = 0 ({list(x.shape)}).")
        if not bool(torch.isfinite(x).all()):
            bad = ~torch.isfinite(x)
            inputs = torch.nonzero(bad.reshape(x.shape[0], -1).any(1)).flatten().tolist()
            shown = ", ".join(map(str, inputs[:5])) + (", ..." if len(inputs) > 5 else "")
            raise ValueError(
                f"Expected finite {name} but got {int(bad.sum())} NaN/inf values in {len(inputs)} of {x.shape[0]} "
                f"inputs (index {shown}); clean or drop them before routing."
            )

    def router_spec(self, num_classes: int, spatial: bool) -> RouterSpec:
        """What every router of this pipeline is built from (`routerkit.routers.create_router`'s ``router_spec``)."""
        return RouterSpec(self.num_actions, self.partitioner.grid_shape, num_classes, spatial)

    def base_passes(self, router: Router) -> int:
        """Forwards of ``f_0`` on the whole input that routing with ``router`` costs."""
        if not router.uses_base:
            return 0
        return self.estimator.num_passes if router.uses_uncertainty else 1

    def base_flops(self, router: Router | None) -> float:
        """FLOPs per input of running ``f_0`` as ``router`` needs it (``None``: the estimator's state)."""
        if router is not None and self.base_passes(router) == 0:
            return 0.0
        if router is None or router.uses_uncertainty:
            return float(self.accountant.estimator_flops(self.estimator))
        return float(self.accountant.base_flops)

    def base_output(self, x: Tensor, router: Router) -> BaseOutput:
        """Run ``f_0`` as ``router`` needs it (MC passes, one pass, or not at all)."""
        passes = self.base_passes(router)
        if passes == 0:
            zeros = x.new_zeros((x.shape[0], 1, *x.shape[2:]))  # f_0 not needed: placeholder state
            return BaseOutput(zeros, zeros[:, 0])
        if router.uses_uncertainty:
            return self.estimator(self.zoo.base, x)
        return SoftmaxEntropy()(self.zoo.base, x)

    def policy_flops(self, router: Router, base: BaseOutput) -> int:
        """FLOPs of the router's own network per input."""
        module = router.flops_module()
        if module is None:
            return 0
        return self.accountant.module_flops(module, tuple(router.policy_input(base).shape[1:]))

    def route(
        self,
        x: Tensor,
        router: Router,
        greedy: bool = True,
        generator: torch.Generator | None = None,
        targets: Tensor | None = None,
    ) -> RoutedOutput:
        """Route a batch end to end.

        Pick-first routers decide every unit from ``f_0``'s state, then the executor runs the
        chosen models; cascades (``router.is_cascade``) run stage by stage and pay every stage
        a unit went through.

        Args:
            x: ``[B, *input_shape]`` inputs.
            router: The strategy deciding per unit.
            greedy: Arg-max decisions (evaluation) rather than samples.
            generator: Random generator for sampled decisions.
            targets: Labels, only for routers that need them (the oracle).

        Returns:
            Stitched probabilities, decisions and FLOPs per input.
        """
        with self._grad_context():
            return self._route(x, router, greedy, generator, targets)

    def _route(
        self, x: Tensor, router: Router, greedy: bool, generator: torch.Generator | None, targets: Tensor | None
    ) -> RoutedOutput:
        self.check_input(x)
        if router.needs_targets and targets is None:
            raise ValueError(f"{type(router).__name__} needs the targets: pass targets= to route().")
        base = self.base_output(x, router)
        part = self.partitioner
        if router.is_cascade:
            unit_unc = part.split(base.uncertainty.unsqueeze(1)).squeeze(1)
            flat, unit_probs = self.executor.run_cascade(part.split_inputs(x), part.split(base.probs), unit_unc, router)
            actions = flat.reshape(x.shape[0], part.num_units)
            probs = part.stitch(unit_probs, x.shape[0])
            return RoutedOutput(probs, actions, self.flops(actions, router, base), base, Execution(unit_probs))
        with torch.no_grad():
            if router.needs_targets:
                assert targets is not None
                actions = self._labelled_decisions(x, targets, base, router)
            else:
                actions = router.route(base, greedy=greedy, generator=generator)
        return self.execute(x, base, actions, router)

    def _labelled_decisions(self, x: Tensor, targets: Tensor, base: BaseOutput, router: Router) -> Tensor:
        """An oracle's decisions: every model scored on every unit (by the executor) against the labels."""
        part = self.partitioner
        units, unit_targets = part.split_inputs(x), part.split(targets)
        every = self.executor.all_unit_probs(units, part.split(base.probs))
        scores = torch.stack([router.unit_scores(p, unit_targets) for p in every], -1)
        scores = scores.reshape(x.shape[0], part.num_units, self.num_actions)
        return router.best_actions(scores, self.costs.to(scores))

    __call__ = route

    def flops(self, actions: Tensor, router: Router | None, base: BaseOutput) -> Tensor:
        """``[B]`` FLOPs per input of decisions ``actions [B, P]`` made by ``router``.

        Counts the passes of ``f_0`` the router needs, its own network, and the models run on
        the units: the chosen one, or for a cascade every stage up to the chosen one plus the
        stop decision taken after each of those stages.
        """
        cascade = router is not None and router.is_cascade
        counts = paid_counts(actions, self.num_actions, cascade).sum(1)  # a cascade's unit that reached f_i paid f_1..f_i
        policy: float | Tensor = self.policy_flops(router, base) if router is not None else 0
        if router is not None and cascade:
            decisions = torch.tensor([*router.decision_flops(), 0], dtype=torch.float64)
            policy = policy + (counts.double().cpu() * decisions).sum(-1)  # a stop decision at every stage reached
        return self.accountant.per_input(self.base_flops(router), policy, counts)

    def execute(self, x: Tensor, base: BaseOutput, actions: Tensor, router: Router | None = None) -> RoutedOutput:
        """Run given decisions ``actions [B, P]`` on ``x`` with the base output ``base``."""
        with self._grad_context():
            return self._execute(x, base, actions, router)

    def _execute(self, x: Tensor, base: BaseOutput, actions: Tensor, router: Router | None) -> RoutedOutput:
        batch = x.shape[0]
        units = self.partitioner.split_inputs(x)
        base_units = self.partitioner.split(base.probs) if self.base_passes_needed(actions) else None
        execution = self.executor.run(units, actions, base_units)
        probs = self.partitioner.stitch(execution.unit_probs, batch)
        return RoutedOutput(probs, actions, self.flops(actions, router, base), base, execution)

    @staticmethod
    def base_passes_needed(actions: Tensor) -> bool:
        """Whether any unit uses ``f_0``'s output."""
        return bool((actions == 0).any())
