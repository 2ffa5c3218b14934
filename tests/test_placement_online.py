"""Online re-balancing's decisions (moe_infer.placement.online): a re-fit from a window of loads moves the fewest
experts that reach the fitted balance, keeps the placement when the gain is below the threshold, gives the same
answer every time (every rank computes it alone), and refuses what it cannot do with one clear message."""

import numpy as np
import pytest

from moe_infer.placement import PlacementError
from moe_infer.placement.online import (
    Move,
    RebalanceOptions,
    keep_ranks,
    move_cost,
    moves,
    refit,
    window_balancedness,
)

CONTIGUOUS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _window(load_E, calls=6, seed=0):
    """int64 [W, E]: per-call loads around `load_E`."""
    rng = np.random.default_rng(seed)
    return rng.poisson(np.asarray(load_E, dtype=float), size=(calls, len(load_E)))


def test_a_skewed_window_moves_few_experts_and_evens_the_ranks():
    window = _window([40, 38, 36, 34, 2, 2, 1, 1])  # rank 0 holds all the hot experts
    new, before, after = refit(window, CONTIGUOUS, RebalanceOptions(interval=4, window=8))
    assert before < 0.55 and after > 0.95  # mean / max rank load: 1/D when one rank does everything
    assert sorted(e for rank in new for e in rank) == list(range(8)) and all(len(rank) == 4 for rank in new)
    # Two hot experts cross over and two cold ones come back: 4 moves, not 8 (the groups keep their ranks).
    assert len(moves(CONTIGUOUS, new)) == 4
    assert window_balancedness(window, new) == pytest.approx(after)
    assert refit(window, CONTIGUOUS, RebalanceOptions(interval=4, window=8)) == (new, before, after)  # deterministic


@pytest.mark.parametrize("algorithm", ["greedy", "anti-correlation", "eplb"])
def test_every_algorithm_refits_and_an_even_window_keeps_the_placement(algorithm):
    options = RebalanceOptions(interval=1, window=8, algorithm=algorithm)
    new, before, after = refit(_window([40, 38, 36, 34, 2, 2, 1, 1]), CONTIGUOUS, options)
    assert new is not None and after > before + 0.15
    even = _window([10, 1, 10, 1, 1, 10, 1, 10], calls=200)
    assert refit(even, [[0, 1, 2, 3], [4, 5, 6, 7]], options)[0] is None  # already even: nothing worth moving
    assert refit(np.zeros((3, 8)), CONTIGUOUS, options)[0] is None  # no tokens: nothing to learn


def test_a_gain_below_the_threshold_keeps_the_placement():
    window = _window([12, 10, 10, 10, 10, 10, 10, 10], calls=50, seed=1)
    assert refit(window, CONTIGUOUS, RebalanceOptions(interval=1, window=50, min_gain=0.5))[0] is None


def test_keep_ranks_gives_each_group_to_the_rank_holding_most_of_it():
    fitted = [[4, 5, 6, 0], [1, 2, 3, 7]]  # mostly rank 1's experts in group 0
    assert keep_ranks(fitted, CONTIGUOUS) == [[1, 2, 3, 7], [4, 5, 6, 0]]
    assert moves(CONTIGUOUS, keep_ranks(fitted, CONTIGUOUS)) == [Move(0, 0, 1), Move(7, 1, 0)]


@pytest.mark.parametrize(
    "options, named",
    [
        (RebalanceOptions(interval=0, window=8), "--rebalance-interval"),
        (RebalanceOptions(interval=2, window=8, algorithm="random"), "unknown algorithm 'random'"),
        (RebalanceOptions(interval=2, window=8, redundant_experts=2), "--redundant-experts 2 is not supported"),
    ],
)
def test_bad_options_are_named(options, named):
    with pytest.raises(PlacementError, match=named):
        options.check()


def test_move_cost_counts_an_experts_tensors():
    # lm-tiny (D 128, F 256, GELU, fp32): 263,680 bytes per expert, the bytes the engine moves per expert there.
    cost = move_cost(hidden=128, ffn=256, moe_layers=2, experts=8, ranks=2, dtype_bytes=4)
    assert cost["expert_bytes"] == (256 * 128 + 256 + 128 * 256 + 128) * 4 == 263_680
    assert cost["bytes_max"] == 2 * 4 * 263_680 and cost["bytes_per_rank_per_layer_max"] == 4 * 263_680
    assert move_cost(32, 48, 1, 8, 2, 4, swiglu=True)["expert_bytes"] == (96 * 32 + 96 + 32 * 48 + 32) * 4
