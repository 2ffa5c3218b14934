"""Static dispatch (static gating, the baseline of fairseq / GShard / DeepSpeed TopKGate): every expert gets a fixed
capacity of C slots, the tokens are moved with one-hot mask products into padded [E, C, D] buffers, and equal-size
all-to-alls carry those buffers. Pairs past an expert's capacity are dropped (the token keeps only the caller's
residual path); empty slots are zero rows that the experts compute anyway: the waste the paper measures.

    C = max(1, ceil(capacity_fraction * T_max))        T_max: the most tokens any rank of the group brought
                                                       (agreed once per forward pass: tokens.py)
    slot of each pair = running count per expert, first choices of all tokens before any second choice (GShard)
    dispatch  dispatch_TPC one-hot -> buf_PCD = einsum(dispatch, x) -> all-to-all (Buffers)
    experts   each local expert on all R*C slots of its buffer, padding included
    combine   all-to-all back -> y_TD = einsum(dispatch, out_PCD)

The routing probability is applied inside the expert, as in the reference (moe_infer.model.moe): a real slot gets its
pair's probability, a padded slot 0, so padding contributes exactly 0 (the fc2 bias is scaled by it too) and the
combine mask is 0/1. With a capacity that drops nothing the output equals the reference dispatch/combine.

Shape legend: T tokens, K experts per token, D model dim, N pairs (K*T, choice-major), E experts, P expert positions
(rank * L + slot, E of them), C capacity slots per expert, R ranks, L experts per rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_infer.moe.dispatch.exchange import ExpertGroup
from moe_infer.moe.dispatch.tokens import Agreement
from moe_infer.moe.experts import Rows
from moe_infer.moe.stats import PhaseTimer
from moe_infer.placement import Placement
from pipeline.errors import PipelineError


@dataclass
class Buffers:
    """The padded buffers this rank received, as every local expert's R*C slots (rows: padding included, the waste
    this scheme is known for); the experts write into y_LRCD, which the combine sends back."""

    rows: Rows
    y_LRCD: torch.Tensor
    dispatch_TPC: torch.Tensor  # the one-hot dispatch mask, reused by the combine
    timer: PhaseTimer


class StaticDispatch:
    def __init__(self, placement: Placement, capacity_fraction: float, group: dist.ProcessGroup | None = None):
        if not hasattr(placement, "position_of_E"):
            raise PipelineError(
                "static gating: expert replicas are not supported (its buffers hold one block per expert); "
                "serve a placement with replicas with the dynamic policy"
            )
        if not capacity_fraction > 0:
            raise PipelineError(f"static gating: capacity_fraction must be > 0, got {capacity_fraction}")
        self.placement, self.capacity_fraction = placement, capacity_fraction
        self.ranks = ExpertGroup(placement, group)
        self.tokens = Agreement(self.ranks)
        self._position_of_E = placement.position_of_E

    def capacity(self, max_tokens: int) -> int:
        return max(1, math.ceil(self.capacity_fraction * max_tokens))

    def dispatch(
        self,
        x_TD: torch.Tensor,
        probs_TK: torch.Tensor,
        experts_TK: torch.Tensor,
        prepare: Callable[[list[int], bool], None],
        timer: PhaseTimer,
    ) -> Buffers:
        """This rank's buffers of its local experts; `prepare(active_L, overlapped)` is told that every slot runs
        (while the buffers travel, when they do)."""
        num_tokens, topk = experts_TK.shape
        R, L = self.placement.ranks, self.placement.experts_per_rank
        E, D = R * L, x_TD.shape[-1]
        stats = timer.stats

        # Every rank must agree on C: the all-to-all splits are fixed E*C-row blocks (the counts are agreed once per
        # forward pass, moe_infer.moe.dispatch.tokens).
        C = self.capacity(max(self.tokens(num_tokens, x_TD.device)))
        # Choice-major pairs (n = k*T + t), so the cumsum fills every token's first choice before any second one.
        position_N = self._position_of_E.to(experts_TK.device)[experts_TK.t().reshape(-1)]
        token_N = torch.arange(num_tokens, device=x_TD.device).repeat(topk)
        probs_N = probs_TK.t().reshape(-1).float()
        mask_NP = torch.nn.functional.one_hot(position_N, E)
        slot_N = ((torch.cumsum(mask_NP, dim=0) - 1) * mask_NP).sum(1)
        kept_N = slot_N < C
        stats.pairs_dropped = int((~kept_N).sum())
        token_N, position_N, slot_N, probs_N = token_N[kept_N], position_N[kept_N], slot_N[kept_N], probs_N[kept_N]
        dispatch_TPC = torch.zeros(num_tokens, E, C, dtype=x_TD.dtype, device=x_TD.device)
        dispatch_TPC[token_N, position_N, slot_N] = 1
        probs_PC = torch.zeros(E, C, dtype=torch.float32, device=x_TD.device)  # the combine weights, per slot
        probs_PC[position_N, slot_N] = probs_N
        stats.padded_slots = E * C - token_N.numel()
        timer.lap("gate")

        buf_PCD = torch.einsum("tpc,td->pcd", dispatch_TPC, x_TD)
        # Position-major buffers: rank r's block of L experts goes to rank r; what comes back is [source, slot, C].
        blocks = [L * C] * R
        rows_in_flight = self.ranks.start_all_to_all(buf_PCD.reshape(E * C, D), blocks, blocks, stats)
        probs_in_flight = self.ranks.start_all_to_all(probs_PC.reshape(E * C), blocks, blocks, stats)
        # Every expert computes its slots, empty or not; a buffered store copies them in while the buffers travel.
        prepare(list(range(L)), R > 1)
        # Every expert's R*C slots contiguous (a copy with several sources: what arrives is source-major).
        x_MD = rows_in_flight.wait().view(R, L, C, D).transpose(0, 1).reshape(L * R * C, D)
        probs_M = probs_in_flight.wait().view(R, L, C).transpose(0, 1).reshape(L * R * C)
        y_LRCD = x_MD.new_empty(L, R, C, D)
        stats.expert_rows = R * L * C
        timer.lap("dispatch")
        rows = Rows(x_MD, probs_M, [R * C] * L, y_LRCD.view(L * R * C, D))
        return Buffers(rows, y_LRCD, dispatch_TPC, timer)

    def combine(self, routed: Buffers) -> torch.Tensor:
        """[T, D]: the experts' outputs back to the ranks their tokens came from, each token's kept slots summed."""
        L, R, C, D = routed.y_LRCD.shape
        E, blocks = R * L, [L * C] * R
        y_RLCD = routed.y_LRCD.transpose(0, 1)
        out_PCD = self.ranks.all_to_all(y_RLCD.reshape(E * C, D), blocks, blocks, routed.timer.stats).view(E, C, D)
        return torch.einsum("tpc,pcd->td", routed.dispatch_TPC.to(out_PCD.dtype), out_PCD)
