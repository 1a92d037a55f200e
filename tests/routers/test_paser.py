"""PaSeR's router: its state, optionally with the input itself."""

from __future__ import annotations

import pytest
import torch

from routerkit.routers import PaSeRRouter
from routerkit.uncertainty import BaseOutput

# --- the input in the state (router.params.input_channels) -------------------------------------------


def _state(inputs: torch.Tensor | None) -> BaseOutput:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 16, 16, generator=g), 1)
    return BaseOutput(probs, -(probs * probs.log()).sum(1), inputs)


def test_a_policy_with_input_channels_reads_the_input() -> None:
    torch.manual_seed(0)
    router = PaSeRRouter(3, (2, 2), num_classes=3, input_channels=1).eval()
    a = router.logits(_state(torch.zeros(2, 1, 16, 16)))
    b = router.logits(_state(torch.ones(2, 1, 16, 16)))
    assert a.shape == (2, 4, 3) and not torch.allclose(a, b)
    assert router.policy_input(_state(torch.zeros(2, 1, 16, 16))).shape[1] == 5  # K + 1 + 1


def test_the_papers_state_ignores_the_input() -> None:
    torch.manual_seed(0)
    router = PaSeRRouter(3, (2, 2), num_classes=3).eval()
    assert torch.equal(router.logits(_state(torch.zeros(2, 1, 16, 16))), router.logits(_state(torch.ones(2, 1, 16, 16))))


def test_input_channels_errors_name_the_field() -> None:
    router = PaSeRRouter(3, (2, 2), num_classes=3, input_channels=1)
    with pytest.raises(ValueError, match="input_channels"):
        router.logits(_state(None))
    with pytest.raises(ValueError, match="input_channels is 1 but the input has 3 channels"):
        router.logits(_state(torch.zeros(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="input_channels"):
        PaSeRRouter(3, (2, 2), num_classes=3, input_channels=-1)
    with pytest.raises(ValueError, match="spatial"):
        PaSeRRouter(3, (1, 1), num_classes=3, spatial=False, input_channels=1)


def test_an_estimator_hands_the_input_to_the_state() -> None:
    from routerkit.models import ToySegmenter
    from routerkit.uncertainty import create_estimator

    x = torch.rand(2, 1, 8, 8)
    out = create_estimator("softmax_entropy")(ToySegmenter(width=2), x)
    assert out.inputs is x and out.select(slice(0, 1)).inputs.shape == (1, 1, 8, 8)  # type: ignore[union-attr]


def test_the_input_channels_are_charged_in_the_policys_flops() -> None:
    from routerkit import PatchGrid, RoutedPipeline, Zoo
    from routerkit.models import ToySegmenter

    pipe = RoutedPipeline(
        Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=4)]), PatchGrid(2, 2), "mc_dropout", "flops", (1, 16, 16)
    )
    probs = torch.softmax(torch.randn(1, 2, 16, 16), 1)
    state = BaseOutput(probs, -(probs * probs.log()).sum(1), torch.rand(1, 1, 16, 16))
    paper = PaSeRRouter(2, (2, 2), num_classes=2)
    reads_input = PaSeRRouter(2, (2, 2), num_classes=2, input_channels=1)
    assert pipe.policy_flops(reads_input, state) > pipe.policy_flops(paper, state) > 0
