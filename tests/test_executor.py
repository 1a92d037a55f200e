"""Tests of routerkit.executor.Executor against a naive per-unit loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from routerkit import Executor, PatchGrid, WholeInput, Zoo
from routerkit.models import ToyClassifier, ToySegmenter, UNet
from routerkit.partitioners import Partitioner


def seg_zoo(m: int, k: int) -> Zoo:
    torch.manual_seed(m)
    members: list[nn.Module] = [ToySegmenter(1, k, width=2, dropout=0.2)]
    for i in range(1, m):
        members.append(UNet(1, k, base_channels=2, depth=1) if i % 2 else ToySegmenter(1, k, width=2 + 3 * i))
    return Zoo(members).eval()


def cls_zoo(m: int, k: int, d: int) -> Zoo:
    torch.manual_seed(10 + m)
    return Zoo([ToyClassifier(d, k, hidden=4 + 4 * i) for i in range(m)]).eval()


def naive(zoo: Zoo, units: Tensor, actions: Tensor, base_probs: Tensor) -> Tensor:
    """Each unit alone through its chosen model (f_0: the given base probabilities)."""
    rows = []
    with torch.no_grad():
        for u, a in enumerate(actions.reshape(-1).tolist()):
            if a == 0:
                rows.append(base_probs[u])
            else:
                rows.append(torch.softmax(zoo[a](units[u : u + 1]), dim=1)[0])
    return torch.stack(rows)


def count_calls(zoo: Zoo) -> list[list[int]]:
    calls: list[list[int]] = [[] for _ in zoo]
    for i, model in enumerate(zoo):
        model.register_forward_hook(lambda module, args, out, i=i: calls[i].append(args[0].shape[0]))
    return calls


CASES = [
    (2, PatchGrid(2, 2), (1, 8, 8)),
    (4, PatchGrid(2, 2), (1, 8, 8)),
    (4, PatchGrid(1, 4), (1, 6, 12)),
    (2, WholeInput(), (1, 6, 6)),
    (4, WholeInput(), (1, 6, 6)),
    (2, WholeInput(), (5,)),
    (4, WholeInput(), (5,)),
]


@pytest.mark.parametrize(("m", "part", "shape"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_units", [None, 3])
def test_executor_matches_naive_loop(m: int, part: Partitioner, shape: tuple[int, ...], seed: int, max_units: int | None) -> None:
    k, batch = 3, 5
    zoo = cls_zoo(m, k, shape[0]) if len(shape) == 1 else seg_zoo(m, k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)
    units = part.split(x)
    actions = torch.randint(0, m, (batch, part.num_units), generator=gen)
    base_probs = torch.softmax(torch.randn(units.shape[0], k, *units.shape[2:], generator=gen), dim=1)
    calls = count_calls(zoo)
    with torch.no_grad():
        result = Executor(zoo, part, max_units=max_units).run(units, actions, base_probs)
    calls = [list(c) for c in calls]  # snapshot before the reference loop calls the models too
    expected = naive(zoo, units, actions, base_probs)
    assert result.unit_probs.shape == expected.shape
    assert torch.allclose(result.unit_probs, expected, atol=1e-5)
    flat = actions.reshape(-1)
    assert calls[0] == []  # f_0 never runs in the executor
    for i in range(1, m):
        n_i = int((flat == i).sum())
        step = max_units or max(n_i, 1)
        assert sum(calls[i]) == n_i
        assert len(calls[i]) == -(-n_i // step)  # once per batch, or once per chunk
        if n_i:
            idx, logits = result.logits[i]
            assert torch.equal(idx, torch.nonzero(flat == i, as_tuple=True)[0])
            assert logits.shape[0] == n_i
        else:
            assert i not in result.logits
    # Units of action 0 keep the base probabilities untouched.
    assert torch.equal(result.unit_probs[flat == 0], base_probs[flat == 0])


def test_executor_each_model_called_once_per_batch() -> None:
    zoo = seg_zoo(4, 2)
    part = PatchGrid(2, 2)
    x = torch.randn(6, 1, 8, 8)
    actions = torch.tensor([[0, 1, 2, 3]] * 6)
    calls = count_calls(zoo)
    Executor(zoo, part).run(part.split(x), actions, torch.rand(24, 2, 4, 4))
    assert calls == [[], [6], [6], [6]]


def test_executor_without_base_unit_choice() -> None:
    zoo = seg_zoo(3, 2)
    part = PatchGrid(2, 2)
    x = torch.randn(2, 1, 8, 8)
    actions = torch.tensor([[1, 2, 2, 1], [2, 2, 1, 1]])
    with torch.no_grad():
        out = Executor(zoo, part).run(part.split(x), actions, None)
    expected = naive(zoo, part.split(x), actions, torch.empty(0))
    assert torch.allclose(out.unit_probs, expected, atol=1e-5)


def test_executor_keeps_autograd_graph_of_logits() -> None:
    zoo = seg_zoo(2, 2)
    part = PatchGrid(2, 2)
    out = Executor(zoo, part).run(part.split(torch.randn(1, 1, 8, 8)), torch.tensor([[1, 1, 0, 1]]), torch.rand(4, 2, 4, 4))
    idx, logits = out.logits[1]
    assert logits.requires_grad and idx.tolist() == [0, 1, 3]
    assert not out.unit_probs.requires_grad


def test_executor_errors() -> None:
    zoo = seg_zoo(2, 2)
    part = PatchGrid(2, 2)
    units = part.split(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="chose f_0 but no base-model output"):
        Executor(zoo, part).run(units, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), None)
    with pytest.raises(ValueError, match="one action per unit"):
        Executor(zoo, part).run(units, torch.ones(2, 3, dtype=torch.long), None)
    with pytest.raises(ValueError, match="max_units"):
        Executor(zoo, part, max_units=0)


def test_estimator_flops_follow_the_estimator_and_its_settings() -> None:
    import gc

    from routerkit.executor import FlopAccountant
    from routerkit.models import ToySegmenter, Zoo
    from routerkit.partitioners import PatchGrid
    from routerkit.uncertainty import create_estimator

    zoo = Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=4)])
    acc = FlopAccountant(zoo, PatchGrid(2, 2), (1, 8, 8))
    est = create_estimator("mc_dropout", num_passes=2)
    two = acc.estimator_flops(est)
    est.num_passes = 6  # changed in place: counted again
    assert acc.estimator_flops(est) == 3 * two
    for passes in (1, 4, 1, 4):  # new estimators, possibly at a freed one's address, are never served a stale count
        assert acc.estimator_flops(create_estimator("mc_dropout", num_passes=passes)) == passes * two // 2
        gc.collect()
