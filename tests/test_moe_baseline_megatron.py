"""The megatron-core MoELayer baseline (moe_infer.moe.baselines.megatron) against the single-process reference
(moe_infer.model.moe dispatch / combine over ExpertFFN modules with the same weights), on a small random MoE layer:
EP=1 on one gloo rank and EP=2 on two, each in spawned processes so megatron's global parallel state never reaches
the pytest process. Different token counts per rank, one rank with none.

The worker `_check_megatron` runs inside each rank: it asserts the outputs and this rank's stats itself (the expected
rows and bytes are worked out from every rank's routing, which each rank can recompute from the seeds) and returns
its MoEStats so the test can check the sums across ranks.
"""

import pytest
import torch
import torch.distributed as dist
from moe_layers import D, E, layer_config, random_layer, reference_moe

from moe_infer.moe.baselines.megatron import MegatronBlock
from moe_infer.moe.stats import MoEStats
from moe_infer.placement import Placement
from pipeline.errors import PipelineError
from pipeline.platform.testing import run_distributed

# (topk, router pre_softmax, activation, router bias)
# (topk, router pre_softmax, router bias, activation): layer_config's arguments.
CASES = [(1, True, True, "gelu"), (2, False, True, "gelu"), (2, True, True, "gelu")]
EXTRA_CASES = [(2, False, True, "swiglu"), (2, True, False, "gelu")]  # EP=1 only: the activation and the zero bias


def _tokens(case: int, rank: int, count: int) -> torch.Tensor:
    return torch.randn(count, D, generator=torch.Generator().manual_seed(100 * case + rank))


def _check_megatron(token_count_sets: list[list[int]], cases: list[tuple]) -> list[MoEStats]:
    world = dist.get_world_size()
    rank = dist.get_rank()
    placement = Placement.contiguous(E, world)
    local = placement.local_experts(rank)
    out = []
    for case, params in enumerate(cases):
        cfg = layer_config(*params)
        router, experts = random_layer(cfg)
        block = MegatronBlock(
            cfg,
            {name: t.clone() for name, t in router.state_dict().items()},
            {e: {name: t.clone() for name, t in experts[e].state_dict().items()} for e in local},
            placement,
        )
        for counts in token_count_sets:  # the same block, called again with other counts
            # Every rank's routing, to know the rows and bytes megatron must move. A rank with no tokens routes one
            # zero row (the block's stand-in for an empty batch).
            routed_R = [router(_tokens(case, r, n) if n else torch.zeros(1, D))[1] for r, n in enumerate(counts)]
            rank_of_R = [placement.rank_of_E[experts_TK.reshape(-1)] for experts_TK in routed_R]
            sent = int((rank_of_R[rank] != rank).sum())
            received = sum(int((ranks_N == rank).sum()) for r, ranks_N in enumerate(rank_of_R) if r != rank)

            x_TD = _tokens(case, rank, counts[rank])
            y_TD, s = block(x_TD)
            probs_TK, experts_TK = router(x_TD)
            expected_TD = reference_moe(x_TD, probs_TK, experts_TK, experts)
            assert y_TD.shape == (counts[rank], D)
            torch.testing.assert_close(y_TD, expected_TD, rtol=1e-5, atol=1e-5, msg=f"case {params} counts {counts}")

            topk = params[0]
            assert (s.tokens, s.pairs_routed, s.pairs_dropped) == (counts[rank], counts[rank] * topk, 0)
            assert s.expert_rows == sum(int((ranks_N == rank).sum()) for ranks_N in rank_of_R)
            if world == 1:
                assert s.bytes_sent == s.bytes_received == 0
            else:
                # counts all-gather + each routed row with its fp32 probability out, its output row back
                counts_bytes, row = (world - 1) * E * 8, D * 4
                assert s.bytes_sent == counts_bytes + sent * (row + 4) + received * row, (params, counts)
                assert s.bytes_received == counts_bytes + received * (row + 4) + sent * row, (params, counts)
            assert set(s.seconds) == {"gate", "dispatch", "experts", "combine"}
            assert all(v >= 0 for v in s.seconds.values()) and sum(s.seconds.values()) > 0
            out.append(s)
    if world > 1:
        _check_ep_size_mismatch(cases[0])
    return out


def _check_ep_size_mismatch(params: tuple) -> None:
    """megatron's parallel state already set up for EP=1 in a 2-rank world: the block refuses it clearly."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=1)
    cfg = layer_config(*params)
    router, experts = random_layer(cfg)
    local = Placement.contiguous(E, 2).local_experts(dist.get_rank())
    with pytest.raises(PipelineError, match="already initialized in this process with expert_model_parallel_size=1"):
        MegatronBlock(cfg, router.state_dict(), {e: experts[e].state_dict() for e in local}, Placement.contiguous(E, 2))


@pytest.mark.slow  # CI time: the two-rank test runs the same block with expert parallelism
def test_megatron_block_equals_the_reference_on_one_rank():
    [stats] = run_distributed(_check_megatron, world_size=1, args=([[13], [0]], CASES + EXTRA_CASES), timeout_s=60)
    assert len(stats) == 2 * len(CASES + EXTRA_CASES)


def test_megatron_block_equals_the_reference_on_two_ranks():
    # Uneven counts, then a rank with no tokens at all: it still takes part in every collective.
    per_rank = run_distributed(_check_megatron, world_size=2, args=([[7, 12], [0, 11]], CASES), timeout_s=90)
    for calls in zip(*per_rank, strict=True):
        assert sum(s.bytes_sent for s in calls) == sum(s.bytes_received for s in calls)
        assert all(s.bytes_sent > 0 for s in calls)  # expert parallelism really moved rows


def test_a_non_contiguous_placement_is_refused():
    cfg = layer_config(1, True)
    placement = Placement.from_rank_lists([[0, 2, 4, 6], [1, 3, 5, 7]], num_experts=E)
    with pytest.raises(PipelineError, match=r"rank 0 holds experts \[0, 2, 4, 6\].*only places experts contiguously"):
        MegatronBlock(cfg, {}, {}, placement)
    # One rank, experts out of order: megatron's local expert k is global expert k, so this is refused too.
    with pytest.raises(PipelineError, match="only places experts contiguously"):
        MegatronBlock(cfg, {}, {}, Placement.from_rank_lists([[1, 0, *range(2, E)]], num_experts=E))


def test_without_torch_distributed_the_error_says_so():
    cfg = layer_config(1, True)
    with pytest.raises(PipelineError, match="torch.distributed is not initialized"):
        MegatronBlock(cfg, {}, {}, Placement.contiguous(E, 1))
