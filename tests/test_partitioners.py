"""Tests of routerkit.partitioners: PatchGrid split/stitch and WholeInput."""

from __future__ import annotations

import pytest
import torch

from routerkit.partitioners import PatchGrid, WholeInput, create_partitioner

CASES = [
    # (batch, channels, rows, cols, patch_h, patch_w)
    (1, 1, 1, 1, 3, 5),
    (2, 3, 2, 2, 4, 4),
    (3, 1, 4, 4, 14, 16),
    (2, 2, 3, 5, 2, 3),
    (4, 1, 1, 3, 7, 1),
    (1, 4, 5, 1, 1, 6),
]


@pytest.mark.parametrize(("b", "c", "rows", "cols", "h", "w"), CASES)
def test_split_stitch_identity_4d(b: int, c: int, rows: int, cols: int, h: int, w: int) -> None:
    grid = PatchGrid(rows, cols)
    x = torch.randn(b, c, rows * h, cols * w)
    units = grid.split(x)
    assert units.shape == (b * rows * cols, c, h, w)
    assert torch.equal(grid.stitch(units, b), x)
    assert grid.unit_shape(tuple(x.shape[1:])) == (c, h, w)


@pytest.mark.parametrize(("b", "c", "rows", "cols", "h", "w"), CASES)
def test_split_stitch_identity_3d(b: int, c: int, rows: int, cols: int, h: int, w: int) -> None:
    grid = PatchGrid(rows, cols)
    x = torch.randint(0, 10, (b, rows * h, cols * w))
    units = grid.split(x)
    assert units.shape == (b * rows * cols, h, w)
    assert torch.equal(grid.stitch(units, b), x)


@pytest.mark.parametrize(("b", "c", "rows", "cols", "h", "w"), CASES)
def test_split_is_row_major(b: int, c: int, rows: int, cols: int, h: int, w: int) -> None:
    grid = PatchGrid(rows, cols)
    x = torch.randn(b, c, rows * h, cols * w)
    units = grid.split(x)
    masks = torch.randint(0, 3, (b, rows * h, cols * w))
    mask_units = grid.split(masks)
    for s in range(b):
        for r in range(rows):
            for col in range(cols):
                p = r * cols + col
                assert torch.equal(units[s * grid.num_units + p], x[s, :, r * h : (r + 1) * h, col * w : (col + 1) * w])
                assert torch.equal(mask_units[s * grid.num_units + p], masks[s, r * h : (r + 1) * h, col * w : (col + 1) * w])


def test_random_shapes_roundtrip() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        rows, cols, h, w, b, c = (int(v) for v in torch.randint(1, 6, (6,), generator=gen))
        grid = PatchGrid(rows, cols)
        x = torch.randn(b, c, rows * h, cols * w, generator=gen)
        assert torch.equal(grid.stitch(grid.split(x), b), x)
        # stitch(split) on channel-less masks too
        m = x[:, 0]
        assert torch.equal(grid.stitch(grid.split(m), b), m)


@pytest.mark.parametrize(("height", "width"), [(9, 8), (8, 10), (7, 7)])
def test_non_divisible_raises_with_grid_and_size(height: int, width: int) -> None:
    grid = PatchGrid(4, 4)
    with pytest.raises(ValueError) as info:
        grid.split(torch.zeros(1, 1, height, width))
    message = str(info.value)
    assert "PatchGrid(4, 4)" in message
    assert f"{height} x {width}" in message
    with pytest.raises(ValueError, match=f"{height} x {width}"):
        grid.unit_shape((1, height, width))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="rows >= 1"):
        PatchGrid(0, 2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        PatchGrid(2, 2).split(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="Expected 8 units"):
        PatchGrid(2, 2).stitch(torch.zeros(7, 1, 2, 2), 2)


def test_properties_and_repr() -> None:
    grid = PatchGrid(3, 2)
    assert grid.num_units == 6 and grid.grid_shape == (3, 2)
    assert repr(grid) == "PatchGrid(rows=3, cols=2)"
    assert create_partitioner("patch_grid", rows=2, cols=5).grid_shape == (2, 5)
    assert isinstance(create_partitioner("whole_input"), WholeInput)
    assert create_partitioner(grid) is grid


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (5, 7), (2, 4, 4)])
def test_whole_input_identity(shape: tuple[int, ...]) -> None:
    part = WholeInput()
    x = torch.randn(shape)
    units = part.split(x)
    assert torch.equal(units, x)
    assert torch.equal(part.stitch(units, shape[0]), x)
    assert part.num_units == 1 and part.grid_shape == (1, 1)
    assert part.unit_shape(shape[1:]) == shape[1:]
    with pytest.raises(ValueError, match="Expected 4 units"):
        part.stitch(torch.zeros(3, 1), 4)


# --- context margin (halo) ---------------------------------------------------------------------------


def test_a_halo_widens_each_unit_with_its_neighbours_and_crop_undoes_it() -> None:
    import torch

    from routerkit.partitioners import PatchGrid

    grid = PatchGrid(2, 2, halo=2)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    units = grid.split_inputs(x)
    assert units.shape == (8, 3, 8, 8) and grid.model_unit_shape((3, 8, 8)) == (3, 8, 8)
    assert torch.equal(grid.crop(units), grid.split(x))
    # unit 3 of sample 0 is the bottom-right patch: its halo holds the neighbouring pixels above and left
    assert torch.equal(units[3, :, :, :], torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")[0, :, 4:12, 4:12])
    assert torch.equal(units[3, 0, 0, 2:6], x[0, 0, 2, 4:8])  # two rows above the patch, inside the image
    assert torch.equal(units[0, 0, 2:6, 0], x[0, 0, 0:4, 2])  # reflected at the image's left border


def test_no_halo_is_the_plain_split() -> None:
    import torch

    from routerkit.partitioners import PatchGrid

    grid = PatchGrid(2, 2)
    x = torch.randn(1, 1, 8, 8)
    assert grid.halo == 0 and torch.equal(grid.split_inputs(x), grid.split(x)) and grid.crop(x) is x


@pytest.mark.parametrize("halo", [-1, 1.5, True, "2"])
def test_a_bad_halo_is_refused(halo: object) -> None:
    from routerkit.partitioners import PatchGrid

    with pytest.raises(ValueError, match="halo"):
        PatchGrid(2, 2, halo=halo)  # type: ignore[arg-type]


def test_a_routed_pipeline_with_a_halo_charges_the_widened_units() -> None:
    import torch

    from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
    from routerkit.models import UNet

    torch.manual_seed(0)
    zoo = Zoo({"f0": UNet(1, 3, 2, 1, dropout=0.1), "f1": UNet(1, 3, 4, 1)}).eval()
    plain = RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 16, 16))
    wide = RoutedPipeline(zoo, PatchGrid(2, 2, halo=4), "mc_dropout", "flops", (1, 16, 16))
    router = create_router("single", num_actions=2, grid_shape=(2, 2), index=1)
    x = torch.rand(3, 1, 16, 16)
    a, b = plain.route(x, router), wide.route(x, router)
    assert a.probs.shape == b.probs.shape == (3, 3, 16, 16)
    assert wide.accountant.unit_flops[1] == pytest.approx(plain.accountant.unit_flops[1] * (16 * 16) / (8 * 8), rel=0.05)
    assert float(b.flops[0]) > float(a.flops[0])
    # the unit's centre gets the same prediction only if the model ignores context: a UNet does not
    assert not torch.allclose(a.probs, b.probs)
