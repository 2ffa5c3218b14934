"""Expert placement and the dispatchers (dispatch -> experts -> combine) against the single-process reference
(moe_infer.model.moe dispatch / combine over every expert), on a small random MoE layer: EP=1 in this process, EP=2 on
two real gloo ranks with different token counts per rank (one rank with none).

The worker `_check_policies` runs inside each rank: it asserts the outputs itself and returns every call's
MoEStats so the test can check the byte counts across ranks.
"""

import math

import pytest
import torch
import torch.distributed as dist
from moe_layers import D, E, kept_within_capacity, layer_config, random_layer, reference_moe

from moe_infer.model.routing_kernels import route
from moe_infer.moe.dispatch import DynamicDispatch, StaticDispatch
from moe_infer.moe.dispatch.dynamic import row_width
from moe_infer.moe.dispatch.exchange import ExpertGroup, as_columns, from_columns
from moe_infer.moe.layer import build_moe_layer, share_token_counts
from moe_infer.moe.stats import MoEStats, PhaseTimer
from moe_infer.placement import Placement, PlacementError
from pipeline.errors import ConfigError, PipelineError
from pipeline.platform.testing import run_distributed

CASES = [(1, True), (1, False), (2, True), (2, False)]  # (topk, router pre_softmax)
SMALL_CAPACITY = 0.1  # drops pairs for these token counts: C = max(1, ceil(0.1 * T_max))


class _SlotExperts:
    """Only this rank's experts, by local slot: a row sent to the wrong rank or slot meets the wrong expert. Checks
    the expert-store contract too: the dispatcher names the slots it will run before the experts run exactly those, in
    that order."""

    def __init__(self, experts):
        self.experts, self.planned = experts, None

    def prepare(self, active_L, overlapped):
        assert self.planned is None or self.planned == [], f"slots {self.planned} were prepared but not run"
        self.planned = list(active_L)

    def __call__(self, rows):
        assert self.planned == rows.active_L, f"slots {rows.active_L} run but {self.planned} were prepared"
        self.planned = []
        start = 0
        for slot, n in enumerate(rows.rows_L):
            end = start + n
            rows.y_MD[start:end] = self.experts[slot](rows.x_MD[start:end], rows.probs_M[start:end])
            start = end


def _moe(dispatcher, x_TD, probs_TK, experts_TK, experts) -> tuple[torch.Tensor, MoEStats]:
    """dispatch -> experts -> combine, as the served layer runs them (moe_infer.moe.layer)."""
    stats = MoEStats(tokens=x_TD.shape[0], pairs_routed=experts_TK.numel())
    timer = PhaseTimer(stats, x_TD.device)
    routed = dispatcher.dispatch(x_TD, probs_TK, experts_TK, experts.prepare, timer)
    experts(routed.rows)
    timer.lap("experts")
    y_TD = dispatcher.combine(routed)
    timer.lap("combine")
    return y_TD, stats


def _dynamic(placement, exchange: str) -> DynamicDispatch:
    dispatcher = DynamicDispatch(placement)
    dispatcher.exchange = exchange  # what MOE_DISPATCH forces
    return dispatcher


def _check_policies(token_counts: list[int]) -> list[tuple[str, MoEStats]]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    placement = Placement.contiguous(E, world)
    local = placement.local_experts(rank)
    stats = []
    for case, (topk, pre_softmax) in enumerate(CASES):
        router, experts = random_layer(layer_config(topk, pre_softmax))
        gen = torch.Generator().manual_seed(100 * case + rank)
        x_TD = torch.randn(token_counts[rank], D, generator=gen)
        probs_TK, experts_TK = router(x_TD)
        expected_TD = reference_moe(x_TD, probs_TK, experts_TK, experts)

        store = _SlotExperts([experts[e] for e in local])

        for name, dispatcher in [
            ("dynamic-all-to-all", _dynamic(placement, "all-to-all")),
            ("dynamic-all-gather", _dynamic(placement, "all-gather")),
            ("static", StaticDispatch(placement, 1.0)),
        ]:
            y_TD, s = _moe(dispatcher, x_TD, probs_TK, experts_TK, store)
            torch.testing.assert_close(y_TD, expected_TD, rtol=1e-5, atol=1e-5, msg=f"{name} case {case}")
            assert s.pairs_dropped == 0 and s.pairs_routed == x_TD.shape[0] * topk
            stats.append((name, s))

        small = StaticDispatch(placement, SMALL_CAPACITY)
        y_TD, s = _moe(small, x_TD, probs_TK, experts_TK, store)
        capacity = max(1, math.ceil(SMALL_CAPACITY * max(token_counts)))
        kept_TK = kept_within_capacity(experts_TK, capacity)
        assert s.pairs_dropped == int((~kept_TK).sum()), (case, s.pairs_dropped, int((~kept_TK).sum()))
        assert s.dropped_fraction == (int((~kept_TK).sum()) / kept_TK.numel() if kept_TK.numel() else 0.0)
        assert s.padded_slots == E * capacity - int(kept_TK.sum())
        assert s.expert_rows == world * len(local) * capacity
        # A dropped pair contributes nothing: the reference with its probability zeroed (p scales the whole output).
        torch.testing.assert_close(
            y_TD, reference_moe(x_TD, probs_TK * kept_TK, experts_TK, experts), rtol=1e-5, atol=1e-5
        )
        stats.append(("static-small", s))
    return stats


def _assert_bytes_balance(per_rank: list[list[tuple[str, MoEStats]]]) -> None:
    for calls in zip(*per_rank, strict=True):
        assert sum(s.bytes_sent for _, s in calls) == sum(s.bytes_received for _, s in calls), calls[0][0]


def test_policies_equal_the_reference_on_one_rank():
    stats = _check_policies([13])
    assert all(s.bytes_sent == s.bytes_received == 0 for _, s in stats)
    assert any(s.pairs_dropped for name, s in stats if name == "static-small")
    dynamic = [s for name, s in stats if name.startswith("dynamic")]
    assert all(s.padded_slots == 0 and s.expert_rows == s.pairs_routed for s in dynamic)
    assert all(set(s.seconds) == {"gate", "dispatch", "experts", "combine"} for _, s in stats)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_one_rank_routes_sorts_and_gathers_in_one_call_with_the_usual_result(monkeypatch, pre_softmax):
    """One rank, every expert at its own id: the served dynamic layer takes the compiled one-call routing
    (DynamicDispatch.route_local: the router, the sort and the row gather) where it runs, and its output, figures and
    recorded expert counts equal the usual path's (router, then dispatch) bit for bit. pre_softmax routers have no
    compiled pass: the usual path."""
    cfg = layer_config(2, pre_softmax)
    router, experts = random_layer(cfg)
    tensors = {e: dict(experts[e].state_dict()) for e in range(E)}
    layer = build_moe_layer("dynamic", "dynamic", cfg, dict(router.state_dict()), tensors, Placement.contiguous(E, 1))
    layer.recording, layer.counts = True, []
    x_TD = torch.randn(37, D, generator=torch.Generator().manual_seed(5))
    compiled_router = route(torch.zeros(1, 8), torch.zeros(8, 8), None, 1) is not None  # this CPU and build
    ran, real = [], DynamicDispatch.route_local

    def spy(self, *args):
        routed = real(self, *args)
        ran.append(routed is not None)
        return routed

    with torch.inference_mode():
        monkeypatch.setattr(DynamicDispatch, "route_local", spy)
        one_call, one_call_stats = layer(x_TD), layer.last
        monkeypatch.setattr(DynamicDispatch, "route_local", lambda self, *args: None)
        usual, usual_stats = layer(x_TD), layer.last
    assert ran == [compiled_router and not pre_softmax]
    assert torch.equal(one_call, usual) and torch.equal(layer.counts[0], layer.counts[1])
    assert (one_call_stats.expert_rows, one_call_stats.pairs_routed) == (usual_stats.expert_rows, 37 * 2)
    torch.testing.assert_close(usual, reference_moe(x_TD, *router(x_TD), experts), rtol=1e-5, atol=1e-5)


def test_zero_tokens_on_one_rank():
    stats = _check_policies([0])
    assert all(s.pairs_routed == 0 and s.pairs_dropped == 0 for _, s in stats)


def test_policies_equal_the_reference_on_two_ranks():
    # Uneven counts, then a rank with no tokens at all: it still takes part in every collective.
    for token_counts in ([7, 12], [0, 11]):
        per_rank = run_distributed(_check_policies, world_size=2, args=(token_counts,), timeout_s=60)
        _assert_bytes_balance(per_rank)
        calls = list(zip(*per_rank, strict=True))
        assert any(sum(s.pairs_dropped for _, s in c) for c in calls if c[0][0] == "static-small")
        # Expert parallelism really moved rows: each rank sent something in every call with tokens.
        assert all(sum(s.bytes_sent for _, s in c) > 0 for c in calls)
        # Dynamic sends exactly the routed rows (or each token once); static sends padded buffers, larger here.
        for all_to_all, all_gather, static in zip(calls[0::4], calls[1::4], calls[2::4], strict=True):
            names = [name for name, _ in all_to_all + all_gather + static]
            assert names == ["dynamic-all-to-all"] * 2 + ["dynamic-all-gather"] * 2 + ["static"] * 2
            for dynamic in (all_to_all, all_gather):
                assert sum(s.bytes_sent for _, s in dynamic) < sum(s.bytes_sent for _, s in static)


def _stack_of_two_layers(token_counts: list[int], exchange: str) -> int:
    """Two dynamic layers of one stack, linked (share_token_counts), four forward passes with changing counts: each
    equals the reference, and only the first layer of a pass agrees on the counts. With the all-gather, a pass after
    the first takes the previous pass's counts as its block and learns the real ones from the rows' headers: no
    agreement at all, and one gather more when a rank brought more tokens than that. Returns (all-reduces, gathers)."""
    import moe_infer.moe.dispatch.tokens as tokens

    rank = dist.get_rank()
    cfg = layer_config(2, False)
    router, experts = random_layer(cfg)
    placement = Placement.contiguous(E, 2)
    tensors = {e: dict(experts[e].state_dict()) for e in placement.local_experts(rank)}
    layers = [
        build_moe_layer("dynamic", f"decoder.layers.{n}", cfg, dict(router.state_dict()), tensors, placement)
        for n in (2, 4)
    ]
    share_token_counts(layers)
    reductions, gathers = [], []
    real, real_gather = tokens.all_reduce, ExpertGroup.start_all_gather
    tokens.all_reduce = lambda *a, **k: reductions.append(a) or real(*a, **k)
    ExpertGroup.start_all_gather = lambda *a, **k: gathers.append(a) or real_gather(*a, **k)
    try:
        # Pass 3: only the second rank outgrows the guessed block; the first, whose tokens fit, must gather again too.
        grown = [token_counts[0], token_counts[1] + 1]
        for step, counts in enumerate((token_counts, token_counts, grown, [0, 0])):
            x_TD = torch.randn(counts[rank], D, generator=torch.Generator().manual_seed(step * 10 + rank))
            for layer in layers:
                layer.dispatcher.exchange = exchange
                expected = reference_moe(x_TD, *router(x_TD), experts)
                torch.testing.assert_close(layer(x_TD), expected, rtol=1e-5, atol=1e-5)
    finally:
        tokens.all_reduce, ExpertGroup.start_all_gather = real, real_gather
    with pytest.raises(PipelineError, match="every MoE layer of a stack must see the same tokens"):
        layers[1](torch.randn(5, D))
    return len(reductions), len(gathers)


@pytest.mark.parametrize(
    "exchange, calls",
    [
        ("all-to-all", (4, 0)),  # one agreement per pass
        # Pass 1 agrees (no counts yet), 2 gathers; pass 2 (same counts) 2 gathers; pass 3 (one rank brings one
        # token more than the guessed block) 3 gathers; pass 4 (no tokens: the second layer has nothing to gather) 1.
        ("all-gather", (1, 8)),
    ],
)
def test_the_layers_of_a_stack_agree_on_token_counts_once_per_forward_pass(exchange, calls):
    assert run_distributed(_stack_of_two_layers, world_size=2, args=([3, 6], exchange), timeout_s=60) == [calls] * 2


def test_rows_carry_their_numbers_bit_for_bit():
    probs_NK = torch.rand(5, 2)
    positions_NK = torch.randint(0, 1000, (5, 2), dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        rows = torch.cat((torch.randn(5, 8).to(dtype), as_columns(probs_NK, dtype), as_columns(positions_NK, dtype)), 1)
        width = 2 * 4 // rows.element_size()
        assert torch.equal(from_columns(rows[:, 8 : 8 + width], torch.float32), probs_NK)
        assert torch.equal(from_columns(rows[:, 8 + width :], torch.int32), positions_NK)
    assert row_width(129, 1, torch.float32) == 132 and row_width(128, 4, torch.bfloat16) == 136


def test_an_unknown_exchange_is_refused(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH", "broadcast")
    with pytest.raises(ConfigError, match="MOE_DISPATCH"):
        DynamicDispatch(Placement.contiguous(8, 1))


# ---- placement ------------------------------------------------------------------------------------------------------


def test_contiguous_placement():
    p = Placement.contiguous(8, 2)
    assert p.local_experts(0) == [0, 1, 2, 3] and p.local_experts(1) == [4, 5, 6, 7]
    assert p.rank_of_E.tolist() == [0] * 4 + [1] * 4 and p.slot_of_E.tolist() == [0, 1, 2, 3] * 2
    assert p.experts_per_rank == 4 and p.num_experts == 8
    q = Placement.from_rank_lists([[5, 0], [3, 1], [2, 4]], num_experts=6)
    assert q.local_experts(0) == [5, 0] and q.rank_of_E[3] == 1 and q.slot_of_E[4] == 1
    assert q.position_of_E.tolist() == [1, 3, 4, 2, 5, 0]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Placement.contiguous(6, 4), "6 experts cannot be split evenly over 4 ranks"),
        (lambda: Placement.from_rank_lists([[0, 1], [1, 2]], 4), "expert 1 is placed twice"),
        (lambda: Placement.from_rank_lists([[0, 1], [2]], 4), r"expert\(s\) \[3\] are not placed"),
        (lambda: Placement.from_rank_lists([[0, 1], [2, 3, 4]], 4), "lists expert 4, outside 0..3"),
        (lambda: Placement.from_rank_lists([[0, 1, 2], [3]], 4), r"ranks hold \[3, 1\] experts"),
        (lambda: Placement([0, 0, 1, 1], [0, 2, 0, 1], 2), r"rank 0 holds experts \[0, 1\] in slots \[0, 2\]"),
        (lambda: Placement([0, 0, 1, 2], [0, 1, 0, 1], 2), r"expert\(s\) \[3\] are on rank\(s\) \[2\]"),
        (lambda: Placement([0, 1], [0], 2), "rank_of_E has 2 entries but slot_of_E has 1"),
        (lambda: Placement.contiguous(4, 2).local_experts(2), "rank 2 is outside 0..1"),
    ],
)
def test_placement_errors_say_what_is_wrong(build, message):
    with pytest.raises(PlacementError, match=message):
        build()


def test_a_two_rank_placement_needs_a_process_group():
    with pytest.raises(PipelineError, match="^dispatch: the placement spans 2 ranks but torch.distributed is not init"):
        DynamicDispatch(Placement.contiguous(8, 2))
    with pytest.raises(PipelineError, match=r"^static gating: capacity_fraction must be > 0, got 0\.0$"):
        StaticDispatch(Placement.contiguous(8, 1), 0.0)
