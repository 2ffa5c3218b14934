"""Placement algorithms for one MoE layer: which experts each of D ranks holds, from the layer's load history.

    contiguous(8, 2)                     [[0, 1, 2, 3], [4, 5, 6, 7]]       the layout without history
    greedy(load_E, 2)                    the paper's: hottest expert first, to the least-loaded rank with room
    anti_correlation(load_BE, 2)         the paper's MT-decoder variant: experts that fire together are kept apart
    replicate(load_E, ranks_D, 1)        beyond the paper: extra copies of the hottest experts on spare slots
    eplb(load_E, 8, 8)                   beyond the paper, DeepSeek-EPLB style: copy counts and packing chosen together

Every function returns a placement as `list[list[int]]`: entry r lists rank r's global expert ids in local-slot
order (what Placement.from_rank_lists and the placement file take). Without replicas each rank holds E / D experts
and each expert is on exactly one rank; after `replicate` an expert may be on several ranks (never twice on one),
its tokens then split evenly over its copies. `eplb` with R extra slots fills E + R slots, ranks holding
floor((E + R) / D) or one more (so any R works, e.g. E/8 = 8 extra slots on 16 ranks).

Ties (equal loads, equal rank loads) go to the lower expert id and the lower rank, so results are deterministic.

Shape legend: B batches, E experts, D ranks, K experts still to place.
"""

from __future__ import annotations

import numpy as np

from moe_infer.placement.map import PlacementError


def contiguous(num_experts: int, ranks: int) -> list[list[int]]:
    """Rank r holds experts r*E/D ... (r+1)*E/D - 1: the layout the engine uses without a placement file."""
    per_rank = _experts_per_rank(num_experts, ranks)
    return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ranks)]


def greedy(load_E: np.ndarray, ranks: int) -> list[list[int]]:
    """The paper's greedy number partitioning: experts by mean load, descending, each to the least-loaded rank that
    still has room. `load_E` is any per-expert load (mean tokens per batch, shares, totals: only the order and the
    ratios matter)."""
    load_E = _as_load(load_E)
    return _place_in_order(load_E, ranks, lambda expert, placed: [sum(load_E[n] for n in rank) for rank in placed])


def anti_correlation(load_BE: np.ndarray, ranks: int, weight: float = 0.5) -> list[list[int]]:
    """The paper's anti-correlation placement: greedy order, but when placing expert m a rank's load counts each of
    its experts n as load(n) + weight * corr(m, n), corr the Pearson correlation of their per-batch loads.

    Loads are taken as shares of all routed tokens (summing to 1 over the experts), so `weight` is on the scale of a
    share, as in the paper; with raw token counts the correlation term would vanish next to the loads.
    """
    load_BE = np.asarray(load_BE, dtype=np.float64)
    if load_BE.ndim != 2 or load_BE.shape[0] < 1:
        raise PlacementError(f"anti-correlation placement: loads of shape {load_BE.shape}, expected [B >= 1, E]")
    mean_E = load_BE.mean(axis=0)
    share_E = mean_E / mean_E.sum() if mean_E.sum() > 0 else mean_E
    corr_EE = pearson_corr(load_BE)

    def rank_loads(expert: int, placed: list[list[int]]) -> list[float]:
        return [sum(share_E[n] + weight * corr_EE[expert, n] for n in rank) for rank in placed]

    return _place_in_order(share_E, ranks, rank_loads)


def pearson_corr(load_BE: np.ndarray) -> np.ndarray:
    """float64 [E, E]: Pearson correlation of the experts' per-batch loads; 0 wherever a column is constant (its
    correlation is undefined, and an expert whose load never varies cannot fire together with another)."""
    centred_BE = load_BE - load_BE.mean(axis=0)
    norm_E = np.sqrt((centred_BE**2).sum(axis=0))
    varies_E = norm_E > 1e-12 * max(1.0, float(np.abs(load_BE).max(initial=0.0)))
    unit_BE = np.where(varies_E, centred_BE / np.where(varies_E, norm_E, 1.0), 0.0)
    return np.clip(unit_BE.T @ unit_BE, -1.0, 1.0)


def replicate(load_E: np.ndarray, placement: list[list[int]], extra_slots: int) -> list[list[int]]:
    """`placement` plus up to `extra_slots` replicas, hot experts first: each goes to the expert with the highest load
    per copy, on the least-loaded rank that does not hold it yet (appended after that rank's slots). A replicated
    expert's tokens are split evenly over its copies, which is how the rank loads here (and in metrics.py) count.

    A copy moves half (a third, ...) of the expert's load to another rank, which can unbalance a placement that was
    already even (two ranks: the copy can only go to the other one). So a replica is only taken when it lowers the
    largest rank load; otherwise the next hottest expert is tried, and slots no replica helps stay empty.
    """
    load_E = _as_load(load_E)
    if extra_slots < 0:
        raise PlacementError(f"replication: extra_slots must be >= 0, got {extra_slots}")
    placed = [list(rank) for rank in placement]
    copies_E = np.zeros(len(load_E), dtype=np.int64)
    for rank in placed:
        for expert in rank:
            copies_E[expert] += 1
    if (copies_E == 0).any():
        raise PlacementError(f"replication: expert(s) {np.flatnonzero(copies_E == 0).tolist()} are not placed")
    for _ in range(extra_slots):
        replica = _best_replica(load_E, copies_E, placed)
        if replica is None:
            break
        expert, rank = replica
        copies_E[expert] += 1
        placed[rank].append(expert)
    return placed


def _best_replica(load_E: np.ndarray, copies_E: np.ndarray, placed: list[list[int]]) -> tuple[int, int] | None:
    """(expert, rank) of the hottest-per-copy expert whose extra copy lowers the largest rank load, or None."""
    current_max = max(_rank_loads(load_E, copies_E, placed))
    for expert in sorted(range(len(load_E)), key=lambda e: (-load_E[e] / copies_E[e], e)):
        free = [r for r, rank in enumerate(placed) if expert not in rank]
        if not free:
            continue  # already on every rank: its load is as spread as it can be
        copies_E[expert] += 1
        # Rank loads with the expert's share already split, before the new copy lands: where it should go.
        loads_D = _rank_loads(load_E, copies_E, placed)
        rank = min(free, key=lambda r: (loads_D[r], r))
        new_max = max(loads_D[r] + (load_E[expert] / copies_E[expert] if r == rank else 0) for r in range(len(placed)))
        copies_E[expert] -= 1
        if new_max < current_max - 1e-12:
            return expert, rank
    return None


def eplb(load_E: np.ndarray, ranks: int, extra_slots: int) -> list[list[int]]:
    """Replication planned together with placement, as DeepSeek's EPLB: `replica_counts` hands the E + R slots out
    as copies, then `pack_copies` packs every copy at once. Unlike `replicate`, a copy never has to fit into a
    placement fitted without it: greedy's layout is rebuilt around the split loads.

    With no extra slots this is `greedy`. `load_E` is what the packing balances: the mean load per batch, or a
    statistic that also weighs how much an expert's load varies (see __main__.fit_layer)."""
    load_E = _as_load(load_E)
    return pack_copies(load_E, replica_counts(load_E, ranks, extra_slots), ranks)


def replica_counts(load_E: np.ndarray, ranks: int, extra_slots: int) -> np.ndarray:
    """int64 [E]: copies of each expert, E + `extra_slots` in all. Each extra slot goes to the expert with the largest
    load per copy (ties: lower id), which minimises the largest load per copy; at most `ranks` copies, one per rank."""
    load_E = _as_load(load_E)
    num_experts = len(load_E)
    if ranks < 1 or not 0 <= extra_slots <= num_experts * (ranks - 1):
        raise PlacementError(
            f"replication: {extra_slots} extra slots for {num_experts} experts on {ranks} ranks; expected "
            f"0 ... {num_experts * max(ranks - 1, 0)} (at most one copy of an expert per rank)"
        )
    copies_E = np.ones(num_experts, dtype=np.int64)
    for _ in range(extra_slots):
        per_copy_E = np.where(copies_E < ranks, load_E / copies_E, -np.inf)
        copies_E[int(np.argmax(per_copy_E))] += 1  # argmax: the first of equal maxima, the lower id
    return copies_E


def pack_copies(load_E: np.ndarray, copies_E: np.ndarray, ranks: int) -> list[list[int]]:
    """Balanced packing of copies: experts by load per copy, descending (ties: lower id), each copy to the least-loaded
    rank that has a free slot and does not hold the expert yet (ties: lower rank). Rank r's load counts
    load / copies for every expert it holds, as metrics.py does.

    The C = copies_E.sum() slots are split as evenly as possible: every rank holds floor(C / D) copies and C mod D of
    them, whichever the packing fills last, one more. The greedy choice could strand a later expert (its copies need
    distinct ranks, and only one rank has free slots left), so each choice is checked against the Gale-Ryser
    condition; when it fails, the copies go to the ranks with the most free slots instead, which always leaves a
    packing that can be finished."""
    load_E = _as_load(load_E)
    copies_E = np.asarray(copies_E, dtype=np.int64)
    if copies_E.shape != load_E.shape or (copies_E < 1).any() or (copies_E > ranks).any():
        raise PlacementError(
            f"packing: copies {copies_E.tolist()} for {len(load_E)} experts on {ranks} ranks; expected 1 ... {ranks} "
            "copies of each expert (at most one per rank)"
        )
    base, wide = divmod(int(copies_E.sum()), ranks)  # every rank holds `base` slots, `wide` ranks one more
    if base == 0:
        raise PlacementError(f"packing: {int(copies_E.sum())} slots cannot give each of {ranks} ranks one")
    per_copy_E = load_E / copies_E
    order = sorted(range(len(load_E)), key=lambda e: (-per_copy_E[e], e))
    placed: list[list[int]] = [[] for _ in range(ranks)]
    loads_D = np.zeros(ranks)
    for i, expert in enumerate(order):
        later_K = copies_E[order[i + 1 :]]
        chosen = _least_loaded_ranks(loads_D, placed, base, wide, int(copies_E[expert]))
        if chosen is None or not _can_finish(later_K, _free_slots(_sizes_after(placed, chosen), base, wide)):
            free_D = _free_slots(np.array([len(rank) for rank in placed]), base, wide)
            chosen = sorted(range(ranks), key=lambda r: (-free_D[r], loads_D[r], r))[: copies_E[expert]]
        for rank in chosen:
            placed[rank].append(expert)
            loads_D[rank] += per_copy_E[expert]
    return placed


def _least_loaded_ranks(loads_D, placed, base: int, wide: int, copies: int) -> list[int] | None:
    """The greedy choice: `copies` distinct ranks with free slots, least-loaded first; None if too few have one."""
    sizes_D = np.array([len(rank) for rank in placed])
    chosen: list[int] = []
    for _ in range(copies):
        wide_left = wide - int((sizes_D > base).sum())
        room = [r for r in range(len(placed)) if r not in chosen and (sizes_D[r] < base + (wide_left > 0))]
        if not room:
            return None
        rank = min(room, key=lambda r: (loads_D[r], r))
        chosen.append(rank)
        sizes_D[rank] += 1
    return chosen


def _sizes_after(placed: list[list[int]], chosen: list[int]) -> np.ndarray:
    sizes_D = np.array([len(rank) for rank in placed])
    sizes_D[chosen] += 1
    return sizes_D


def _free_slots(sizes_D: np.ndarray, base: int, wide: int) -> np.ndarray:
    """int64 [D]: free slots per rank, the remaining one-more slots given to the open ranks with the fewest free
    slots. Of all ways to hand them out this one fits the most copies of any k experts into distinct ranks, so the
    Gale-Ryser test on it answers for the flexible rule."""
    free_D = np.maximum(base - sizes_D, 0)
    wide_left = wide - int((sizes_D > base).sum())
    open_D = np.flatnonzero(sizes_D <= base)
    free_D[open_D[np.argsort(free_D[open_D], kind="stable")[:wide_left]]] += 1
    return free_D


def _can_finish(copies_K: np.ndarray, free_D: np.ndarray) -> bool:
    """Gale-Ryser: experts needing copies_K distinct ranks each can exactly fill free_D slots iff the totals match and
    any k experts need no more than sum over ranks of min(free, k)."""
    need_K = np.sort(copies_K)[::-1]
    if need_K.sum() != free_D.sum():
        return False
    return all(need_K[:k].sum() <= np.minimum(free_D, k).sum() for k in range(1, len(need_K) + 1))


def _rank_loads(load_E: np.ndarray, copies_E: np.ndarray, placed: list[list[int]]) -> list[float]:
    return [sum(load_E[e] / copies_E[e] for e in rank) for rank in placed]


def _place_in_order(order_load_E: np.ndarray, ranks: int, rank_loads) -> list[list[int]]:
    """Experts by `order_load_E` descending (ties: lower id first), each to the rank with room whose
    `rank_loads(expert, placed)` is smallest (ties: lower rank)."""
    per_rank = _experts_per_rank(len(order_load_E), ranks)
    order = sorted(range(len(order_load_E)), key=lambda e: (-order_load_E[e], e))
    placed: list[list[int]] = [[] for _ in range(ranks)]
    for expert in order:
        loads_D = rank_loads(expert, placed)
        room = [r for r in range(ranks) if len(placed[r]) < per_rank]
        placed[min(room, key=lambda r: (loads_D[r], r))].append(expert)
    return placed


def _as_load(load_E) -> np.ndarray:
    load_E = np.asarray(load_E, dtype=np.float64)
    if load_E.ndim != 1 or load_E.size == 0 or (load_E < 0).any() or not np.isfinite(load_E).all():
        raise PlacementError(f"placement: expected a non-negative, finite load per expert, got shape {load_E.shape}")
    return load_E


def _experts_per_rank(num_experts: int, ranks: int) -> int:
    if ranks < 1 or num_experts < 1 or num_experts % ranks != 0:
        raise PlacementError(
            f"placement: {num_experts} experts cannot be split evenly over {ranks} ranks "
            "(the number of experts must be a positive multiple of the number of ranks)"
        )
    return num_experts // ranks
