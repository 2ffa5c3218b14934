"""Online re-balancing, the plain-data half: which placement to serve next, from a window of recent loads.

    options = RebalanceOptions(interval=8, window=32, algorithm="greedy")
    new_D = refit(window_WE, current_D, options)      rank lists (as algorithms.py) or None: keep the current one
    moves(current_D, new_D)                           [Move(expert, src, dst), ...]: the experts that change rank

Every rank calls `refit` with the same window (the group's summed loads) and the same current placement, so every
rank gets the same answer without a broadcast: the algorithms break every tie by expert id and rank.

A fitted partition is only a set of groups: which rank takes which group is free. `refit` gives each new group to
the rank that already holds most of its experts (largest overlaps first, ties by rank), so a layer whose balance
needs two experts swapped moves two experts, not all of them. Within a rank, experts that stay keep their order
and arrivals follow, ascending. A new placement is taken only when it raises the window's balancedness by at least
`min_gain`: a placement fitted on noise would move experts for nothing.

The engine half (recording the window, moving the weights, swapping the layer's store) is moe_infer.runtime.rebalance.

Shape legend: W calls in the window, E experts, D ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_infer.placement.algorithms import anti_correlation, eplb, greedy
from moe_infer.placement.map import PlacementError
from moe_infer.placement.metrics import rank_loads

ALGORITHMS = ("greedy", "anti-correlation", "eplb")


@dataclass(frozen=True)
class RebalanceOptions:
    interval: int  # re-fit every `interval` serving steps (steps with model calls)
    window: int  # from the last `window` MoE calls of each layer
    algorithm: str = "greedy"
    redundant_experts: int = 0  # replicas: refused online (see check)
    layers_per_step: int = 1  # layers whose experts move after one step: no step waits for the whole model's moves
    min_gain: float = 0.01  # least rise in the window's balancedness worth a move

    def check(self) -> None:
        """PlacementError naming the first bad field."""
        if self.interval < 1 or self.window < 1 or self.layers_per_step < 1:
            raise PlacementError(
                f"re-balancing: --rebalance-interval ({self.interval}), --rebalance-window ({self.window}) and "
                f"layers per step ({self.layers_per_step}) must each be at least 1"
            )
        if self.algorithm not in ALGORITHMS:
            raise PlacementError(
                f"re-balancing: unknown algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
            )
        if self.redundant_experts:
            raise PlacementError(
                f"re-balancing: --redundant-experts {self.redundant_experts} is not supported online: experts move "
                "one copy at a time. Serve replicas from a fitted placement file instead "
                "(python -m moe_infer.placement fit --algorithm eplb, then --placement FILE)"
            )


@dataclass(frozen=True)
class Move:
    expert: int
    src: int
    dst: int


def window_balancedness(window_WE: np.ndarray, placement_D: list[list[int]]) -> float:
    """Mean over the window's rank loads summed over its calls / their max (1 = even). 1 for a window without
    tokens: nothing to balance."""
    loads_D = rank_loads(np.asarray(window_WE, dtype=np.float64), placement_D).sum(axis=0)
    return float(loads_D.mean() / loads_D.max()) if loads_D.max() > 0 else 1.0


def fit(window_WE: np.ndarray, ranks: int, algorithm: str) -> list[list[int]]:
    """The algorithm's placement for the window's loads (one copy of each expert)."""
    window_WE = np.asarray(window_WE, dtype=np.float64)
    if algorithm == "anti-correlation":
        return anti_correlation(window_WE, ranks)
    mean_E = window_WE.mean(axis=0)
    return greedy(mean_E, ranks) if algorithm == "greedy" else eplb(mean_E, ranks, 0)


def refit(
    window_WE: np.ndarray, current_D: list[list[int]], options: RebalanceOptions
) -> tuple[list[list[int]] | None, float, float]:
    """(the placement to move to, or None to keep `current_D`; the window's balancedness under the current one and
    under the fitted one)."""
    window_WE = np.asarray(window_WE, dtype=np.float64)
    before = window_balancedness(window_WE, current_D)
    if window_WE.size == 0 or window_WE.sum() == 0:
        return None, before, before
    fitted_D = keep_ranks(fit(window_WE, len(current_D), options.algorithm), current_D)
    after = window_balancedness(window_WE, fitted_D)
    if after < before + options.min_gain or not moves(current_D, fitted_D):
        return None, before, before
    return fitted_D, before, after


def keep_ranks(fitted_D: list[list[int]], current_D: list[list[int]]) -> list[list[int]]:
    """`fitted_D`'s groups given to the ranks that hold most of them now; on each rank, the experts it already holds
    first in their current order, then the arrivals ascending."""
    ranks = len(current_D)
    held = [set(experts) for experts in current_D]
    pairs = sorted(
        ((len(held[r] & set(group)), g, r) for g, group in enumerate(fitted_D) for r in range(ranks)),
        key=lambda p: (-p[0], p[1], p[2]),
    )
    rank_of_group: dict[int, int] = {}
    taken: set[int] = set()
    for _, g, r in pairs:
        if g not in rank_of_group and r not in taken:
            rank_of_group[g] = r
            taken.add(r)
    placed: list[list[int]] = [[] for _ in range(ranks)]
    for g, group in enumerate(fitted_D):
        r = rank_of_group[g]
        placed[r] = [e for e in current_D[r] if e in group] + sorted(set(group) - held[r])
    return placed


def moves(current_D: list[list[int]], new_D: list[list[int]]) -> list[Move]:
    """The experts whose rank differs, by expert id."""
    rank_now = {e: r for r, experts in enumerate(current_D) for e in experts}
    rank_new = {e: r for r, experts in enumerate(new_D) for e in experts}
    if sorted(rank_now) != sorted(rank_new):
        raise PlacementError("re-balancing: the new placement does not hold the same experts as the current one")
    return [Move(e, rank_now[e], rank_new[e]) for e in sorted(rank_now) if rank_now[e] != rank_new[e]]


def move_cost(
    hidden: int, ffn: int, moe_layers: int, experts: int, ranks: int, dtype_bytes: int = 2, swiglu: bool = False
) -> dict[str, float]:
    """Bytes one re-balance moves at most: every layer's experts all change rank (a re-fit can move at most E (R-1)/R
    of a layer's experts, each rank sending and receiving at most its E/R), each expert being fc1 (F or 2F x D, bias)
    and fc2 (D x F, bias). Time is these bytes over a link: the caller divides by its bandwidth."""
    fc1 = (2 * ffn if swiglu else ffn) * (hidden + 1)
    expert_bytes = (fc1 + hidden * ffn + hidden) * dtype_bytes
    moved = experts * (ranks - 1) / ranks
    return {
        "expert_bytes": expert_bytes,
        "bytes_per_layer_max": moved * expert_bytes,
        "bytes_max": moe_layers * moved * expert_bytes,
        "bytes_per_rank_per_layer_max": experts / ranks * expert_bytes,
    }
