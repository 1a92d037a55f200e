"""Tests of routerkit.pipeline.RoutedPipeline.check_input: what `route` refuses before running any model."""

from __future__ import annotations

import pytest
import torch

from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
from routerkit.models import ToySegmenter


@pytest.fixture
def pipe() -> RoutedPipeline:
    torch.manual_seed(0)
    zoo = Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=8)]).eval()
    return RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 8, 8))


def test_a_float32_batch_routes(pipe: RoutedPipeline) -> None:
    router = create_router("random", num_actions=2, grid_shape=(2, 2))
    out = pipe(torch.rand(3, 1, 8, 8), router)
    assert out.probs.shape == (3, 2, 8, 8) and bool(torch.isfinite(out.probs).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_other_dtypes_are_refused_with_the_cast_to_apply(pipe: RoutedPipeline, dtype: torch.dtype) -> None:
    router = create_router("random", num_actions=2, grid_shape=(2, 2))
    with pytest.raises(ValueError, match=rf"Expected images of dtype torch\.float32 .* but got {dtype}; call x\.float\(\)"):
        pipe(torch.zeros(2, 1, 8, 8).to(dtype), router)


def test_the_dtype_follows_the_models(pipe: RoutedPipeline) -> None:
    pipe.zoo.double()
    pipe.check_input(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dtype torch\.float64 .* but got torch\.float32; call x\.to\(torch\.float64\)"):
        pipe.check_input(torch.zeros(2, 1, 8, 8))


def test_an_empty_batch_is_refused(pipe: RoutedPipeline) -> None:
    router = create_router("random", num_actions=2, grid_shape=(2, 2))
    with pytest.raises(ValueError, match=r"Expected a non-empty batch of images but got B = 0"):
        pipe(torch.zeros(0, 1, 8, 8), router)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_refused_with_their_count(pipe: RoutedPipeline, value: float) -> None:
    router = create_router("random", num_actions=2, grid_shape=(2, 2))
    x = torch.rand(4, 1, 8, 8)
    x[1, 0, 2, :3] = value  # 3 values in input 1, 1 in input 3
    x[3, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"Expected finite images but got 4 NaN/inf values in 2 of 4 inputs \(index 1, 3\)"):
        pipe(x, router)


def test_wrong_shape_and_type_still_refused(pipe: RoutedPipeline) -> None:
    with pytest.raises(ValueError, match=r"Expected images of shape \[B, 1, 8, 8\] but got \[2, 3, 8, 8\]"):
        pipe.check_input(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"Expected images to be a torch\.Tensor but got list"):
        pipe.check_input([[0.0]])  # type: ignore[arg-type]
