"""Gating policies: how an MoE layer gets its (token, expert) pairs to the experts and the outputs back.

    probs_TK, experts_TK = router(x_TD)
    y_TD, stats = policy(x_TD, probs_TK, experts_TK, run_expert)   run_expert(local_slot, x_ND, probs_N) -> y_ND

A policy replaces the reference `dispatch`/`combine` of moe_infer.model.moe; the router and the experts stay as they
are. `run_expert` (the RunExpert protocol) is told which local slots the call will run (`prepare`, so a buffered
expert store can fetch them), then runs this rank's expert at a local slot (see moe_infer.placement) on the rows it
received, with the routing probability applied inside the expert as the reference does. Under expert parallelism
every rank of the group calls the policy together (with its own tokens, possibly none), since the policies exchange
rows by all-to-all.

    DynamicGating(placement, group)                       sort + count + variable all-to-all: no padding, no drops
    StaticGating(placement, capacity_fraction, group)     fixed capacity, padded buffers, drops past capacity

Shape legend: T tokens, K experts per token, D model dim, N rows, R ranks.
"""

from moe_infer.moe.dispatch.common import ExpertGroup, GatingPolicy, GatingStats, PhaseTimer, RunExpert
from moe_infer.moe.dispatch.dynamic import DynamicGating
from moe_infer.moe.dispatch.static import StaticGating

__all__ = ["DynamicGating", "ExpertGroup", "GatingPolicy", "GatingStats", "PhaseTimer", "RunExpert", "StaticGating"]
