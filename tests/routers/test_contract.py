"""Router contract suite, parametrised over every registered router, plus per-router unit tests."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from routerkit import PatchGrid, RoutedPipeline, WholeInput, Zoo
from routerkit._registry import RegistryError
from routerkit.data import DataBundle
from routerkit.models import ToyClassifier
from routerkit.routers import (
    ConvPolicy,
    MLPPolicy,
    PaSeRRouter,
    RandomRouter,
    Router,
    SingleModelRouter,
    create_router,
    list_routers,
)
from routerkit.uncertainty import BaseOutput

K = 3  # classes
A = 3  # actions
GRID = (2, 2)
ROUTERS = list_routers()


def _pick_first(name: str) -> bool:
    cls = type(create_router(name, num_actions=A, grid_shape=GRID, in_channels=K + 1))
    return not cls.is_cascade and not getattr(cls, "needs_targets", False)


#: Routers that decide every unit from f_0's state alone (cascades and the oracle need more).
PICK_FIRST = [name for name in ROUTERS if _pick_first(name)]


def spatial_state(batch: int = 4, height: int = 16, width: int = 16, seed: int = 0) -> BaseOutput:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(batch, K, height, width, generator=gen) * 3, dim=1)
    return BaseOutput(probs, -(probs * probs.log()).sum(1))


def vector_state(batch: int = 6, seed: int = 0) -> BaseOutput:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(batch, K, generator=gen) * 3, dim=1)
    return BaseOutput(probs, -(probs * probs.log()).sum(1))


def build(name: str, spatial: bool = True) -> Router:
    torch.manual_seed(0)
    grid = GRID if spatial else (1, 1)
    return create_router(name, num_actions=A, grid_shape=grid, in_channels=K + 1, spatial=spatial)


def test_registry_has_the_builtin_routers() -> None:
    assert {"paser", "random", "single", "oracle", "idk", "optimal_stopping"} <= set(ROUTERS)
    assert {"paser", "random", "single"} <= set(PICK_FIRST)


@pytest.mark.parametrize("name", PICK_FIRST)
def test_route_spatial_contract(name: str) -> None:
    router = build(name).eval()
    assert isinstance(router, Router) and isinstance(router, nn.Module)
    assert router.num_actions == A and router.grid_shape == GRID and router.num_units == 4
    for greedy in (True, False):
        actions = router.route(spatial_state(), greedy=greedy, generator=torch.Generator().manual_seed(1))
        assert actions.shape == (4, 4) and actions.dtype == torch.int64
        assert int(actions.min()) >= 0 and int(actions.max()) < A


@pytest.mark.parametrize("name", PICK_FIRST)
def test_route_vector_contract(name: str) -> None:
    try:
        router = build(name, spatial=False).eval()
    except (TypeError, ValueError) as err:  # pragma: no cover - only for routers without vector support
        pytest.skip(f"{name} does not support vector states: {err}")
    for greedy in (True, False):
        actions = router.route(vector_state(), greedy=greedy, generator=torch.Generator().manual_seed(1))
        assert actions.shape == (6, 1) and actions.dtype == torch.int64
        assert int(actions.min()) >= 0 and int(actions.max()) < A


@pytest.mark.parametrize("name", PICK_FIRST)
def test_greedy_routing_is_deterministic(name: str) -> None:
    router = build(name).eval()
    state = spatial_state(seed=3)
    first = router.route(state, greedy=True, generator=torch.Generator().manual_seed(5))
    second = router.route(state, greedy=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    rebuilt = build(name).eval()
    assert torch.equal(first, rebuilt.route(state, greedy=True, generator=torch.Generator().manual_seed(5)))
    if router.is_trainable:  # a learned policy's arg-max needs no randomness at all
        assert torch.equal(router.route(state, greedy=True), router.route(state, greedy=True))


@pytest.mark.parametrize("name", ROUTERS)
def test_flags_and_parameters(name: str) -> None:
    router = build(name)
    for flag in ("is_trainable", "is_cascade", "uses_uncertainty"):
        assert isinstance(getattr(router, flag), bool), flag
    params = [p for p in router.parameters() if p.requires_grad]
    if router.is_trainable:
        assert params, f"{name} is trainable but has no trainable parameters"
    if name not in PICK_FIRST:
        with pytest.raises(RuntimeError, match=r"RoutedPipeline\.route"):  # a clear error, not a wrong answer
            router.route(spatial_state())
    elif router.is_trainable:
        logits_like = router.route(spatial_state(), greedy=True)  # routing works with gradients enabled
        assert logits_like.shape == (4, 4)
    else:
        router.requires_grad_(False)  # non-trainable routers must not need their parameters trained
        assert router.route(spatial_state()).shape == (4, 4)
    module = router.flops_module()
    if module is not None:
        own = {id(p) for p in router.parameters()}
        assert all(id(p) in own for p in module.parameters())


@pytest.mark.parametrize("name", PICK_FIRST)
def test_routers_without_uncertainty_accept_placeholder_state(name: str) -> None:
    router = build(name).eval()
    if router.uses_uncertainty:
        pytest.skip(f"{name} reads the base model's state")
    zeros = torch.zeros(3, 1, 16, 16)
    assert router.route(BaseOutput(zeros, zeros[:, 0])).shape == (3, 4)


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_through_pipeline(name: str, tiny_zoo: Zoo) -> None:
    router = create_router(name, num_actions=2, grid_shape=(2, 2), in_channels=3).eval()
    pipe = RoutedPipeline(tiny_zoo, PatchGrid(2, 2), "mc_dropout", "param_share", (1, 8, 8))
    out = pipe(torch.rand(3, 1, 8, 8), router, targets=torch.randint(0, 2, (3, 8, 8)))
    assert out.probs.shape == (3, 2, 8, 8) and out.actions.shape == (3, 4)
    assert torch.allclose(out.probs.sum(1), torch.ones(3, 8, 8), atol=1e-5)
    assert out.flops.shape == (3,) and bool((out.flops > 0).all())


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_through_pipeline_vectors(name: str) -> None:
    torch.manual_seed(0)
    zoo = Zoo([ToyClassifier(5, K, hidden=4, dropout=0.3), ToyClassifier(5, K, hidden=8), ToyClassifier(5, K, hidden=16)]).eval()
    router = build(name, spatial=False).eval()
    pipe = RoutedPipeline(zoo, WholeInput(), "mc_dropout", "param_share", (5,))
    out = pipe(torch.randn(7, 5), router, targets=torch.randint(0, K, (7,)))
    assert out.probs.shape == (7, K) and out.actions.shape == (7, 1)


@pytest.mark.parametrize("name", ROUTERS)
def test_create_router_by_name_class_instance(name: str) -> None:
    by_name = build(name)
    cls = type(by_name)
    by_class = create_router(cls, num_actions=A, grid_shape=GRID, in_channels=K + 1)
    assert type(by_class) is cls
    assert create_router(by_name) is by_name
    with pytest.raises(ValueError, match="extra arguments"):
        create_router(by_name, num_actions=A)


def test_create_router_unknown_name() -> None:
    with pytest.raises(RegistryError) as info:
        create_router("pasre", num_actions=2)
    message = str(info.value)
    assert "Unknown router 'pasre'" in message and "Did you mean 'paser'" in message
    for name in ROUTERS:
        assert name in message


def test_router_argument_checks() -> None:
    with pytest.raises(ValueError, match="num_actions >= 2"):
        SingleModelRouter(1)
    with pytest.raises(ValueError, match="grid_shape"):
        SingleModelRouter(2, grid_shape=(0, 2))


def test_route_checks_router_output() -> None:
    class Bad(Router):
        def _route(self, state, greedy, generator):  # type: ignore[no-untyped-def]
            return torch.full((state.probs.shape[0], self.num_units), self.num_actions)

    class WrongShape(Router):
        def _route(self, state, greedy, generator):  # type: ignore[no-untyped-def]
            return torch.zeros(state.probs.shape[0], self.num_units + 1, dtype=torch.long)

    with pytest.raises(RuntimeError, match="outside"):
        Bad(2, grid_shape=(2, 2)).route(spatial_state())
    with pytest.raises(RuntimeError, match="returned actions"):
        WrongShape(2, grid_shape=(2, 2)).route(spatial_state())


# --- per-router unit tests -------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_single_model_router(index: int) -> None:
    router = SingleModelRouter(3, index=index, grid_shape=(3, 2))
    actions = router.route(spatial_state(batch=5, height=6, width=4), greedy=False)
    assert actions.shape == (5, 6) and bool((actions == index).all())
    assert router.uses_base is (index == 0)
    assert not router.uses_uncertainty and not router.is_trainable
    with pytest.raises(ValueError, match="index"):
        SingleModelRouter(3, index=3)


def test_random_router_frequencies() -> None:
    probs = [0.1, 0.3, 0.6]
    router = RandomRouter(3, probs=probs, grid_shape=(4, 4), seed=0)
    actions = router.route(spatial_state(batch=2500))
    freq = torch.bincount(actions.reshape(-1), minlength=3).double() / actions.numel()
    n = actions.numel()
    for f, p in zip(freq.tolist(), probs, strict=True):
        assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / n)
    uniform = RandomRouter(4, grid_shape=(4, 4), seed=1).route(spatial_state(batch=2500))
    freq = torch.bincount(uniform.reshape(-1), minlength=4).double() / uniform.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=5 * math.sqrt(0.1875 / uniform.numel()))


def test_random_router_seeded_and_unnormalised_weights() -> None:
    state = spatial_state()
    a = RandomRouter(3, grid_shape=(2, 2), seed=7).route(state)
    b = RandomRouter(3, grid_shape=(2, 2), seed=7).route(state)
    assert torch.equal(a, b)
    router = RandomRouter(3, probs=[2.0, 0.0, 2.0], grid_shape=(2, 2))
    assert torch.allclose(router.weights, torch.tensor([0.5, 0.0, 0.5]))
    assert not bool((router.route(spatial_state(batch=50)) == 1).any())
    for bad in ([0.5, 0.5], [-1.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="non-negative probabilities"):
            RandomRouter(3, probs=bad)


def test_paser_logits_shape_and_policy_kind() -> None:
    router = PaSeRRouter(A, grid_shape=(3, 2), in_channels=K + 1, width=4)
    assert isinstance(router.policy, ConvPolicy)
    logits = router.logits(spatial_state(batch=5, height=12, width=10))
    assert logits.shape == (5, 6, A)
    vec = PaSeRRouter(A, in_channels=K + 1, spatial=False)
    assert isinstance(vec.policy, MLPPolicy)
    assert vec.logits(vector_state(batch=5)).shape == (5, 1, A)
    with pytest.raises(ValueError, match="one unit per input"):
        PaSeRRouter(A, grid_shape=(2, 2), in_channels=K + 1, spatial=False)
    with pytest.raises(ValueError, match="4 channels"):
        router.logits(BaseOutput(torch.rand(2, 2, 8, 8), torch.rand(2, 8, 8)))


@pytest.mark.parametrize("spatial", [True, False])
def test_paser_init_bias(spatial: bool) -> None:
    bias = [math.log(0.2), math.log(0.3), math.log(0.5)]
    grid = (2, 2) if spatial else (1, 1)
    router = PaSeRRouter(A, grid_shape=grid, in_channels=K + 1, spatial=spatial, width=4, init_bias=bias)
    head = router.policy.head if spatial else router.policy.net[-1]
    assert head.bias.tolist() == pytest.approx(bias)
    with torch.no_grad():
        head.weight.zero_()  # logits are then the bias everywhere
    state = spatial_state(batch=3) if spatial else vector_state(batch=3)
    logits = router.logits(state)
    assert torch.allclose(logits, torch.tensor(bias).expand_as(logits))
    assert bool((router.route(state, greedy=True) == 2).all())
    big = spatial_state(batch=2000, height=8, width=8) if spatial else vector_state(batch=8000)
    sampled = router.route(big, greedy=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(sampled.reshape(-1), minlength=A).double() / sampled.numel()
    assert freq.tolist() == pytest.approx([0.2, 0.3, 0.5], abs=0.03)
    with pytest.raises(ValueError, match="init_bias of length 3"):
        PaSeRRouter(A, in_channels=K + 1, init_bias=[0.0, 1.0])


def test_paser_strong_prior_dominates_random_weights() -> None:
    torch.manual_seed(0)
    router = PaSeRRouter(A, grid_shape=(2, 2), in_channels=K + 1, width=4, init_bias=[50.0, 0.0, 0.0]).eval()
    assert bool((router.route(spatial_state()) == 0).all())


def test_conv_policy_is_paper_sized() -> None:
    params = sum(p.numel() for p in ConvPolicy(4, 3, (4, 4), width=12).parameters())
    assert abs(params - 14_736) / 14_736 < 0.05  # PaSeR's policy network: 14,736 parameters


def test_paser_state_scales_uncertainty() -> None:
    router = PaSeRRouter(A, in_channels=K + 1, spatial=False)
    state = vector_state()
    x = router.policy_input(state)
    assert x.shape == (6, K + 1)
    assert torch.equal(x[:, :K], state.probs)
    assert torch.allclose(x[:, K], state.uncertainty / math.log(K))
    assert bool((x[:, K] <= 1 + 1e-6).all())
    assert router.is_trainable and router.uses_uncertainty and not router.is_cascade
    assert router.flops_module() is router.policy


@pytest.mark.parametrize("name", PICK_FIRST)
def test_reset_reproduces_sampled_decisions(name: str) -> None:
    router = build(name).eval()
    state = spatial_state(seed=4)
    router.reset()
    first = [router.route(state, greedy=True) for _ in range(3)]
    router.reset()
    again = [router.route(state, greedy=True) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_random_router_evaluates_identically_twice(tiny_zoo: Zoo, tiny_seg_bundle: DataBundle) -> None:
    from routerkit.metrics import evaluate_router

    router = RandomRouter(2, grid_shape=(2, 2), seed=3)
    pipe = RoutedPipeline(tiny_zoo, PatchGrid(2, 2), "mc_dropout", "param_share", (1, 8, 8))
    runs = [evaluate_router(pipe, router, tiny_seg_bundle.test, num_classes=2, batch_size=1) for _ in range(2)]
    assert runs[0].usage == runs[1].usage
    # Without the reset, the second pass would continue the generator and draw other decisions.
    drawn = router.route(BaseOutput(torch.rand(4, 2, 8, 8), torch.rand(4, 8, 8)))
    router.reset()
    assert not torch.equal(drawn, router.route(BaseOutput(torch.rand(4, 2, 8, 8), torch.rand(4, 8, 8))))


def test_evaluation_is_seeded_and_leaves_the_global_generator_alone(tiny_zoo: Zoo, tiny_seg_bundle: DataBundle) -> None:
    from routerkit.metrics import evaluate_router

    router = PaSeRRouter(2, grid_shape=(2, 2), in_channels=3, width=2).eval()
    pipe = RoutedPipeline(tiny_zoo, PatchGrid(2, 2), "mc_dropout", "param_share", (1, 8, 8))
    torch.manual_seed(11)
    first = evaluate_router(pipe, router, tiny_seg_bundle.test, num_classes=2, batch_size=2)
    after_first = torch.rand(3)
    torch.manual_seed(11)
    torch.rand(100)  # whatever ran before must not matter
    second = evaluate_router(pipe, router, tiny_seg_bundle.test, num_classes=2, batch_size=2)
    assert first == second
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), after_first)  # the caller's generator state was restored


# --- The declared hooks of issue 10, for every registered router -------------------------------------------------


def _hooks_setup():  # type: ignore[no-untyped-def]
    """A patch-grid pipeline of toy segmenters with its replayed table (labels included)."""
    from routerkit.models import ToySegmenter
    from routerkit.replay import build_unit_table
    from routerkit.rewards import Correctness

    torch.manual_seed(0)
    zoo = Zoo([ToySegmenter(1, K, width=2), ToySegmenter(1, K, width=4), ToySegmenter(1, K, width=8)]).eval()
    pipe = RoutedPipeline(zoo, PatchGrid(*GRID), "softmax_entropy", "param_share", (1, 8, 8))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, K, (6, 8, 8), generator=gen)
    from routerkit.data import Split

    table = build_unit_table(pipe, Correctness(K), Split(x, y), K)
    return pipe, x, y, table


@pytest.mark.parametrize("name", ROUTERS)
def test_every_router_declares_its_capabilities(name: str) -> None:
    router = build(name)
    for flag in ("is_trainable", "is_cascade", "uses_uncertainty", "uses_base", "needs_targets"):
        assert isinstance(getattr(router, flag), bool), flag
    flops = router.decision_flops()
    assert isinstance(flops, list)
    assert len(flops) == (A - 1 if router.is_cascade else 0)
    assert isinstance(router.optional_state_keys(), set)


@pytest.mark.parametrize("name", ROUTERS)
def test_every_router_is_built_from_the_pipelines_spec(name: str) -> None:
    pipe, _, _, _ = _hooks_setup()
    spec = pipe.router_spec(K, spatial=True)
    router = create_router(name, router_spec=spec)
    assert router.num_actions == A and router.grid_shape == GRID and router.num_classes == K


@pytest.mark.parametrize("name", ROUTERS)
def test_replayed_decisions_equal_live_routing_for_every_router(name: str) -> None:
    """decide_table on the replayed table takes the decisions live routing takes (the executor runs the models)."""
    pipe, x, y, table = _hooks_setup()
    extra = {"accuracy": "correct"} if name == "oracle" else {}  # the table's accuracy term
    router = create_router(name, router_spec=pipe.router_spec(K, spatial=True), **extra).eval()
    if router.is_cascade and hasattr(router, "set_thresholds"):
        router.set_thresholds([float(table.uncertainty[..., 0].median()), float(table.uncertainty[..., 1].median())])
    router.reset()
    replayed = router.decide_table(table)
    router.reset()
    live = pipe.route(x, router, targets=y if router.needs_targets else None).actions
    assert torch.equal(replayed, live)
    if router.is_cascade:
        stops = router.stop(0, table.unit_probs[:, :, 0].reshape(-1, K), table.uncertainty[:, :, 0].reshape(-1))
        assert stops.dtype == torch.bool and stops.shape == (table.num_inputs * table.num_units,)


@pytest.mark.parametrize("name", ROUTERS)
def test_budget_knobs_move_cost_monotonically(name: str) -> None:
    from routerkit.replay import decide

    _, _, _, table = _hooks_setup()
    router = create_router(name, num_actions=A, grid_shape=GRID, num_classes=K).eval()
    knob = router.budget_knob(table)
    if knob is None:
        assert not router.is_trainable or name not in ("paser", "idk", "optimal_stopping")
        return
    shares = []
    for value in torch.linspace(knob.low, knob.high, 9).tolist():
        knob.set(value)
        shares.append(float((decide(router, table) > 0).double().mean()))
    pairs = list(itertools.pairwise(shares))
    assert all((b >= a) if knob.increasing else (b <= a) for a, b in pairs), shares
    assert shares[0] != shares[-1]  # the knob reaches both ends


def test_oracle_decides_from_labelled_scores_and_others_refuse() -> None:
    pipe, _, y, table = _hooks_setup()
    oracle = create_router("oracle", router_spec=pipe.router_spec(K, spatial=True), accuracy="correct")
    scores = table.accuracy
    assert torch.equal(oracle.best_actions(scores, table.costs), oracle.decide_table(table))
    assert oracle.unit_scores(table.base.probs[:1].repeat(1, 1, 1, 1)[:, :, :4, :4], y[:1, :4, :4]).shape == (1,)
    with pytest.raises(NotImplementedError, match="needs_targets is False"):
        create_router("random", num_actions=A, grid_shape=GRID).best_actions(scores, table.costs)
    with pytest.raises(NotImplementedError, match="not a cascade"):
        create_router("random", num_actions=A, grid_shape=GRID).stop(0, scores[0], scores[0, :, 0])
