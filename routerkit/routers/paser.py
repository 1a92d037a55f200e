"""PaSeR's non-cascading REINFORCE router (Srikishan et al., AAAI 2024)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from routerkit.routers.base import BudgetKnob, Router, register_router
from routerkit.routers.policy_nets import ConvPolicy, MLPPolicy
from routerkit.uncertainty import BaseOutput

if TYPE_CHECKING:
    from routerkit.unit_table import UnitTable


@register_router("paser")
class PaSeRRouter(Router):
    """A policy network on ``[f_0 probabilities, uncertainty]`` choosing a model per unit.

    The state's uncertainty channel is divided by ``log K`` (the maximum entropy) so it lies in
    [0, 1] whatever the number of classes. Decisions are the arg-max at evaluation
    (``greedy=True``) and samples from the policy during training. Training (REINFORCE with
    the explore/exploit schedule) lives in `routerkit.training`.

    Args:
        num_actions: Models m + 1.
        grid_shape: ``(rows, cols)`` unit grid.
        in_channels: State channels (K + 1).
        spatial: Spatial (conv policy) or vector (MLP policy) state.
        width: Conv policy width (``hidden`` for the MLP policy).
        init_bias: Optional initial logit of each action (e.g. a prior towards ``f_0``).
        num_classes: Classes K (the state then has K + 1 channels; overrides ``in_channels``).
        input_channels: Channels of the input itself added to the policy's state (0: the paper's
            state, ``f_0``'s probabilities and uncertainty only). With the input the policy can see
            what ``f_0``'s output does not show (a texture ``f_0`` cannot resolve); its FLOPs grow
            by the first convolution's extra input channels. Spatial states only.
    """

    is_trainable = True

    def __init__(
        self,
        num_actions: int,
        grid_shape: tuple[int, int] = (1, 1),
        in_channels: int = 4,
        spatial: bool = True,
        width: int = 12,
        init_bias: list[float] | None = None,
        num_classes: int | None = None,
        input_channels: int = 0,
    ) -> None:
        super().__init__(num_actions, grid_shape, in_channels, spatial, num_classes)
        if isinstance(input_channels, bool) or not isinstance(input_channels, int) or input_channels < 0:
            raise ValueError(f"Expected router.params.input_channels to be an integer >= 0 but got {input_channels!r}.")
        if input_channels and not spatial:
            raise ValueError("router.params.input_channels needs a spatial state (segmentation); this task's state is a vector.")
        self.input_channels = input_channels
        state_channels = self.in_channels  # K + 1
        in_channels = state_channels + input_channels
        self.policy: nn.Module
        if spatial:
            self.policy = ConvPolicy(in_channels, num_actions, self.grid_shape, width)
            head: nn.Module = self.policy.head
        else:
            if self.grid_shape != (1, 1):
                raise ValueError(f"A vector (non-spatial) state supports one unit per input, got grid {self.grid_shape}.")
            self.policy = MLPPolicy(in_channels, num_actions, hidden=max(width, 8) * 4)
            head = self.policy.net[-1]
        if init_bias is not None:
            if len(init_bias) != num_actions:
                raise ValueError(f"Expected init_bias of length {num_actions} but got {len(init_bias)}.")
            bias = getattr(head, "bias", None)
            if not isinstance(bias, Tensor):
                raise ValueError("init_bias needs a policy head with a bias.")
            with torch.no_grad():
                bias.copy_(torch.as_tensor(init_bias, dtype=torch.float32))
        self.entropy_scale: Tensor
        self.register_buffer("entropy_scale", torch.tensor(1.0 / math.log(max(state_channels - 1, 2))))
        #: Added to the logits when deciding; set by budget calibration (``routerkit calibrate``).
        self.logit_bias: Tensor
        self.register_buffer("logit_bias", torch.zeros(num_actions))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        # runs saved before budget calibration existed have no logit_bias: default to zeros
        state_dict.setdefault(prefix + "logit_bias", torch.zeros_like(self.logit_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def optional_state_keys(self) -> set[str]:
        """``logit_bias``: runs saved before budget calibration existed load with zeros."""
        return {"logit_bias"}

    def policy_input(self, state: BaseOutput) -> Tensor:
        """The policy input ``[B, K + 1 (+ C), ...]``: probabilities, uncertainty scaled to [0, 1] (and the input)."""
        parts = [state.probs, (state.uncertainty * self.entropy_scale).unsqueeze(1)]
        if self.input_channels:
            if state.inputs is None or state.inputs.dim() != state.probs.dim() or state.inputs.shape[2:] != state.probs.shape[2:]:
                got = "none" if state.inputs is None else tuple(state.inputs.shape)
                raise ValueError(
                    f"router.params.input_channels={self.input_channels}: the policy reads the input, which must be "
                    f"[B, {self.input_channels}, *{tuple(state.probs.shape[2:])}], but got {got}."
                )
            if state.inputs.shape[1] != self.input_channels:
                raise ValueError(
                    f"router.params.input_channels is {self.input_channels} but the input has {state.inputs.shape[1]} channels."
                )
            parts.append(state.inputs.to(state.probs.dtype))
        return torch.cat(parts, dim=1)

    def logits(self, state: BaseOutput) -> Tensor:
        """Per-unit action logits ``[B, P, A]``."""
        x = self.policy_input(state)
        expected = self.in_channels + self.input_channels
        if x.shape[1] != expected:
            raise ValueError(f"Expected a state with {expected} channels (K + 1 + input channels) but got {x.shape[1]}.")
        return self.policy(x)

    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> Tensor:
        logits = self.logits(state) + self.logit_bias
        if greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float(), dim=-1).reshape(-1, self.num_actions)
        return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:2])

    def flops_module(self) -> nn.Module:
        return self.policy

    def budget_knob(self, table: UnitTable) -> BudgetKnob:
        """A bias ``-b * (C_i - C_0)`` on the logits: costlier models lose more as ``b`` grows."""
        costs = table.costs - table.costs[0]

        def set_bias(b: float) -> None:
            self.logit_bias.copy_((-b * costs).to(self.logit_bias))

        return BudgetKnob("logit_bias", set_bias, -200.0, 200.0)
