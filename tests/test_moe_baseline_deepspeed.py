"""DeepSpeedBlock (DeepSpeed's MoE layer loaded with our weights) against the single-process reference
(moe_infer.model.moe dispatch / combine over ExpertFFN modules with the same weights): EP=1 in this process, EP=2 on
two real gloo ranks with DeepSpeed's comm, uneven token counts and a rank with none.

The worker `_check_block` runs inside each rank, asserts the outputs itself and returns each call's MoEStats.
"""

import math

import pytest
import torch
import torch.distributed as dist
from moe_layers import D, E, kept_within_capacity, layer_config, random_layer, reference_moe

from moe_infer.moe.baselines.deepspeed import UPSTREAM_PINS, DeepSpeedBlock
from moe_infer.placement import Placement
from pipeline.errors import PipelineError
from pipeline.platform.testing import run_distributed, upstream_source_sha256

# (topk, router pre_softmax, router bias): the combinations DeepSpeed's gates compute.
CASES = [(1, True, True), (1, True, False), (2, False, True), (2, False, False)]
SMALL_CAPACITY = 0.5  # C = ceil(T_max / E * 0.5 * k): drops pairs at these token counts


def _block(cfg, router, experts, placement, rank, capacity_factor, drop_tokens) -> DeepSpeedBlock:
    router_tensors = {name: p.detach() for name, p in router.named_parameters()}
    local = {e: {n: p.detach() for n, p in experts[e].named_parameters()} for e in placement.local_experts(rank)}
    return DeepSpeedBlock(cfg, router_tensors, local, placement, capacity_factor, drop_tokens)


def _capture_routes(block: DeepSpeedBlock) -> list:
    """The expert indices the gate routed each call to ([K, S], -1 = dropped), appended per call."""
    seen = []
    block.gate.register_forward_hook(lambda module, args, out: seen.append(out[3].clone()))
    return seen


def _check_block(world: int, token_counts_per_call: list[list[int]]) -> list[dict]:
    if world > 1:
        from pipeline.platform import init_distributed
        from pipeline.platform.device import detect_platform

        init_distributed(detect_platform("cpu"), timeout_s=60, use_deepspeed=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    placement = Placement.contiguous(E, world)
    results = []
    for case, (topk, pre_softmax, bias) in enumerate(CASES):
        cfg = layer_config(topk, pre_softmax, bias)
        router, experts = random_layer(cfg)
        full = _block(cfg, router, experts, placement, rank, 1.0, drop_tokens=False)
        small = _block(cfg, router, experts, placement, rank, SMALL_CAPACITY, drop_tokens=True)
        small_routes = _capture_routes(small)
        for call, token_counts in enumerate(token_counts_per_call):
            gen = torch.Generator().manual_seed(100 * case + 10 * call + rank)
            x_TD = torch.randn(token_counts[rank], D, generator=gen)
            probs_TK, experts_TK = router(x_TD)
            where = f"case {case} call {call} rank {rank}"

            y_TD, s = full(x_TD)
            torch.testing.assert_close(y_TD, reference_moe(x_TD, probs_TK, experts_TK, experts), rtol=1e-5, atol=1e-5)
            assert y_TD.shape == (x_TD.shape[0], D), where
            assert s.pairs_dropped == 0 and s.pairs_routed == x_TD.shape[0] * topk, where
            # No drop: C is the largest per-expert count on any rank; every rank pads each expert to it.
            results.append(
                dict(
                    name="full",
                    case=case,
                    call=call,
                    stats=s,
                    counts=torch.bincount(experts_TK.reshape(-1), minlength=E),
                )
            )

            y_TD, s = small(x_TD)
            kept_TK = _kept(small_routes[-1], experts_TK)
            capacity = max(1, math.ceil(max(token_counts) / E * SMALL_CAPACITY * topk))
            counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
            assert s.pairs_dropped == int((counts_E - capacity).clamp(min=0).sum()) == int((~kept_TK).sum()), where
            assert s.padded_slots == E * capacity - int(kept_TK.sum()), where
            assert s.expert_rows == E * capacity, where
            if topk == 2:  # top-2 keeps by position: all first choices in token order, then the second choices
                assert torch.equal(kept_TK, kept_within_capacity(experts_TK, capacity)), where
            # A dropped pair contributes nothing; DS top-2 renormalises the weights over the token's kept experts.
            kept_probs_TK = probs_TK * kept_TK
            if topk > 1:
                kept_probs_TK = kept_probs_TK / kept_probs_TK.sum(1, keepdim=True).clamp(min=torch.finfo().eps)
            torch.testing.assert_close(
                y_TD, reference_moe(x_TD, kept_probs_TK, experts_TK, experts), rtol=1e-5, atol=1e-5, msg=where
            )
            results.append(dict(name="small", case=case, call=call, stats=s))
    return results


def _kept(indices_KS: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """[T, K] bool from DS's routes: the gate's k-th route of token t is experts_TK[t, k], or -1 when dropped."""
    routes_TK = indices_KS[:, : experts_TK.shape[0]].t().long()
    assert torch.equal(routes_TK[routes_TK >= 0], experts_TK[routes_TK >= 0])  # same choices, same order as ours
    return routes_TK >= 0


def test_deepspeed_block_equals_the_reference_on_one_rank():
    results = _check_block(1, [[13], [0], [5]])
    assert any(r["stats"].pairs_dropped for r in results if r["name"] == "small")
    for r in results:
        s = r["stats"]
        assert s.bytes_sent == s.bytes_received == 0
        assert set(s.seconds) == {"gate", "dispatch", "experts", "combine"} and all(v >= 0 for v in s.seconds.values())
        if r["name"] == "full" and s.tokens:  # C = the largest expert count: the others are padded to it
            assert s.expert_rows == E * int(r["counts"].max())
            assert s.padded_slots == s.expert_rows - s.pairs_routed


def test_deepspeed_block_equals_the_reference_on_two_ranks():
    # Uneven counts, then a rank with no tokens at all: it still takes part in every collective.
    per_rank = run_distributed(
        _check_block, world_size=2, args=(2, [[7, 12], [0, 11]]), timeout_s=90, init_process_group=False
    )
    for calls in zip(*per_rank, strict=True):
        assert len({(r["name"], r["case"], r["call"]) for r in calls}) == 1
        stats = [r["stats"] for r in calls]
        assert sum(s.bytes_sent for s in stats) == sum(s.bytes_received for s in stats) > 0
        assert len({s.expert_rows for s in stats}) == 1  # one C on every rank
        if calls[0]["name"] == "full":  # C = the largest expert count over both ranks
            assert stats[0].expert_rows == E * max(int(r["counts"].max()) for r in calls)
    assert any(r["stats"].pairs_dropped for r in per_rank[1] if r["name"] == "small")
    assert all(r["stats"].tokens == 0 and r["stats"].pairs_routed == 0 for r in per_rank[0] if r["call"] == 1)


def _one_rank_block(topk=1, pre_softmax=True, bias=True, placement=None):
    cfg = layer_config(topk, pre_softmax, bias)
    router, experts = random_layer(cfg)
    return _block(cfg, router, experts, placement or Placement.contiguous(E, 1), 0, 1.0, False)


@pytest.mark.parametrize(
    "topk, pre_softmax, message",
    [
        (1, False, "top-1 gate takes the softmax over all experts.*router_pre_softmax=False"),
        (2, True, "top-2 gate renormalises the 2 chosen probabilities.*router_pre_softmax=True"),
    ],
)
def test_a_router_deepspeed_cannot_compute_is_refused(topk, pre_softmax, message):
    with pytest.raises(PipelineError, match=message):
        _one_rank_block(topk, pre_softmax)


def test_a_non_contiguous_placement_is_refused():
    # One rank with its experts in another slot order: DS would run expert 0's tokens through expert 7's weights.
    placement = Placement.from_rank_lists([[7, 1, 2, 3, 4, 5, 6, 0]], num_experts=E)
    with pytest.raises(PipelineError, match="supports only the contiguous placement"):
        _one_rank_block(placement=placement)


def test_two_ranks_need_deepspeed_comm():
    with pytest.raises(PipelineError, match="spans 2 ranks but DeepSpeed's comm is not initialized"):
        _one_rank_block(placement=Placement.contiguous(E, 2))


@pytest.mark.parametrize("ref", sorted(UPSTREAM_PINS))
def test_the_deepspeed_code_the_block_relies_on_is_unchanged(ref):
    assert upstream_source_sha256(ref) == UPSTREAM_PINS[ref], (
        f"{ref} changed upstream: re-check moe_infer/moe/baselines/deepspeed.py (_BiasedTopKGate copies "
        "TopKGate.forward; the padding, capacity and statistics follow the gating functions) and update the pin"
    )
