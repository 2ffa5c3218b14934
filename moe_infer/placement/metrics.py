"""How evenly a placement spreads a layer's routed tokens over the ranks, batch by batch (the paper's metrics).

    loads_BD = rank_loads(counts_BE, [[0, 3], [1, 2]])      tokens each rank computes in each batch
    placement_metrics(counts_BE, [[0, 3], [1, 2]])          {"max_load": ..., "avg_max_load": ..., "balancedness": ...}

A rank's share of a batch is its tokens over all the batch's routed tokens (each token counted once per picked
expert), so a perfect spread over D ranks gives every rank 1/D:

    max_load       the largest rank share over all batches (the paper's Max Load; lower is better, >= 1/D)
    avg_max_load   the mean over batches of the largest rank share (the paper's Avg Max Load)
    balancedness   the mean over batches of mean rank load / max rank load (1 = perfectly even, 1/D = one rank
                   does everything)
    total_balancedness   mean / max of the rank loads summed over all batches: the long-run spread, without the
                   batch-to-batch noise a small batch (a decode step of a few tokens) cannot avoid

An expert placed on several ranks (a replica) has its tokens split evenly over its copies. Batches without tokens
tell nothing about balance and are skipped.

Shape legend: B batches, E experts, D ranks.
"""

from __future__ import annotations

import numpy as np

from moe_infer.placement.map import PlacementError


def assignment_ED(placement: list[list[int]], num_experts: int) -> np.ndarray:
    """float64 [E, D]: the fraction of expert e's tokens that rank d computes (1 / copies on each holding rank)."""
    holds_ED = np.zeros((num_experts, len(placement)))
    for rank, experts in enumerate(placement):
        for expert in experts:
            if not 0 <= expert < num_experts:
                raise PlacementError(
                    f"placement metrics: rank {rank} lists expert {expert}, outside 0..{num_experts - 1}"
                )
            holds_ED[expert, rank] += 1
    copies_E = holds_ED.sum(axis=1, keepdims=True)
    if (copies_E == 0).any():
        # Their tokens would go nowhere: the metrics would flatter the placement.
        missing = np.flatnonzero(copies_E[:, 0] == 0).tolist()
        raise PlacementError(f"placement metrics: expert(s) {missing} are not placed on any rank")
    return holds_ED / copies_E


def rank_loads(counts_BE: np.ndarray, placement: list[list[int]]) -> np.ndarray:
    """float64 [B, D]: tokens each rank computes in each batch under `placement`."""
    counts_BE = np.asarray(counts_BE, dtype=np.float64)
    if counts_BE.ndim != 2:
        raise PlacementError(f"placement metrics: counts of shape {counts_BE.shape}, expected [B, E]")
    return counts_BE @ assignment_ED(placement, counts_BE.shape[1])


def placement_metrics(counts_BE: np.ndarray, placement: list[list[int]]) -> dict[str, float]:
    loads_BD = rank_loads(counts_BE, placement)
    total_B = loads_BD.sum(axis=1)
    loads_BD = loads_BD[total_B > 0]
    if loads_BD.shape[0] == 0:
        raise PlacementError("placement metrics: no batch routed any token")
    share_BD = loads_BD / loads_BD.sum(axis=1, keepdims=True)
    max_share_B = share_BD.max(axis=1)
    return {
        "max_load": float(max_share_B.max()),
        "avg_max_load": float(max_share_B.mean()),
        "balancedness": float((loads_BD.mean(axis=1) / loads_BD.max(axis=1)).mean()),
        "total_balancedness": float(loads_BD.sum(axis=0).mean() / loads_BD.sum(axis=0).max()),
    }
