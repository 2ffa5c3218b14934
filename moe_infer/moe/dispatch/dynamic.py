"""Dynamic gating (the paper's first technique): sort the (token, expert) pairs, count them per expert, and send
exactly the routed rows with a variable-size all-to-all. Nothing is padded, nothing is dropped.

    1. pairs sorted (stable) by the position rank * L + slot of their expert; counts_P = bincount per position
    2. all-to-all of counts_P (int64 [E], R blocks of L): each rank learns recv_RL, rows it gets per source x slot
    3. variable all-to-all of the sorted rows and their probabilities, split by those counts
    4. received rows arrive source-major; regroup them by local slot so each expert runs on one contiguous slice
    5. un-group, reverse all-to-all, combine with index_add_ into [T, D]
With one rank (every expert local) steps 2-5 fold into one loop: per expert, gather its rows, run it, index_add_.

Shape legend: T tokens, K experts per token, D model dim, N local pairs (T*K), M rows received, E experts,
P expert positions (rank-major, E of them), R ranks, L experts per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_infer.moe.dispatch.common import ExpertGroup, GatingStats, PhaseTimer, RunExpert
from moe_infer.placement import Placement


class DynamicGating:
    def __init__(self, placement: Placement, group: dist.ProcessGroup | None = None):
        self.placement = placement
        self.ranks = ExpertGroup(placement, group)

    def __call__(
        self, x_TD: torch.Tensor, probs_TK: torch.Tensor, experts_TK: torch.Tensor, run_expert: RunExpert
    ) -> tuple[torch.Tensor, GatingStats]:
        num_tokens, topk = experts_TK.shape
        R, L = self.placement.ranks, self.placement.experts_per_rank
        stats = GatingStats(tokens=num_tokens, pairs_routed=num_tokens * topk)
        timer = PhaseTimer(stats, x_TD.device)

        # 1. Positions are rank-major, so one stable sort groups the pairs by destination rank, then by local slot.
        position_N = self.placement.pair_positions(experts_TK)  # with replicas, a hot expert's pairs are spread
        order_N = torch.argsort(position_N, stable=True)
        token_N = torch.div(order_N, topk, rounding_mode="floor")  # pair n is (token n // K, choice n % K)
        counts_P = torch.bincount(position_N, minlength=R * L)
        timer.lap("gate")
        if R == 1:
            return self._one_rank(x_TD, probs_TK, order_N, token_N, counts_P, run_expert, stats, timer)

        # 2. Counts first: the row exchange needs both its split lists, and the receiver cannot know its own. As the
        # paper says, the count exchange starts as soon as the counts exist and the rows are gathered meanwhile.
        counts_in_flight = self.ranks.start_all_to_all(counts_P, [L] * R, [L] * R, stats)
        # (index_select: a plain row gather, several times faster than x[idx] on CPU.) The probabilities travel
        # separately to stay fp32 whatever x's dtype.
        x_ND = x_TD.index_select(0, token_N)
        probs_N = probs_TK.reshape(-1).float().index_select(0, order_N)
        send_R = counts_P.view(R, L).sum(1).tolist()
        recv_RL = counts_in_flight.wait().view(R, L)
        recv_R = recv_RL.sum(1).tolist()

        # 3. Exactly the routed rows. While they travel, work out how to regroup what arrives.
        rows_in_flight = self.ranks.start_all_to_all(x_ND, send_R, recv_R, stats)
        probs_in_flight = self.ranks.start_all_to_all(probs_N, send_R, recv_R, stats)
        # 4. Row m came from source s for slot l; a stable sort by slot keeps the sources in order within an expert.
        slot_M = torch.arange(L).repeat(R).repeat_interleave(recv_RL.reshape(-1)).to(x_TD.device)
        group_M = torch.argsort(slot_M, stable=True)
        rows_L = recv_RL.sum(0).tolist()
        # A buffered expert store copies in the missing active experts while the rows travel.
        run_expert.prepare([slot for slot, rows in enumerate(rows_L) if rows], overlapped=True)
        x_MD = rows_in_flight.wait().index_select(0, group_M)
        probs_M = probs_in_flight.wait().index_select(0, group_M)
        timer.lap("dispatch")

        # Each expert writes its rows' outputs straight into its slice of one buffer (no concatenation after).
        y_MD = torch.empty_like(x_MD)
        start = 0
        for slot, rows in enumerate(rows_L):
            if rows:
                end = start + rows
                run_expert(slot, x_MD[start:end], probs_M[start:end], y_MD[start:end])
                start = end
        stats.expert_rows = y_MD.shape[0]
        timer.lap("experts")

        # 5. Undo the grouping, send each row back to the rank that owns its token, and sum each token's pairs.
        y_MD = torch.empty_like(y_MD).index_copy_(0, group_M, y_MD)
        y_ND = self.ranks.all_to_all(y_MD, recv_R, send_R, stats)
        out_TD = torch.zeros(num_tokens, x_TD.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
        out_TD.index_add_(0, token_N, y_ND)
        timer.lap("combine")
        return out_TD, stats

    def _one_rank(self, x_TD, probs_TK, order_N, token_N, counts_P, run_expert, stats: GatingStats, timer: PhaseTimer):
        """Every expert is on this rank, so nothing is exchanged: each expert gathers its rows, runs, and adds its
        weighted outputs into its tokens' rows while they are still in cache (no [N, D] staging buffers). The gather
        and the scatter-add are therefore counted in the experts phase."""
        probs_N = probs_TK.reshape(-1).float().index_select(0, order_N)
        out_TD = torch.zeros_like(x_TD)
        rows_L = counts_P.tolist()
        run_expert.prepare([slot for slot, rows in enumerate(rows_L) if rows], overlapped=False)
        timer.lap("dispatch")
        start = 0
        for slot, rows in enumerate(rows_L):
            if rows:
                end = start + rows
                token_n = token_N[start:end]
                out_TD.index_add_(0, token_n, run_expert(slot, x_TD.index_select(0, token_n), probs_N[start:end]))
                start = end
        stats.expert_rows = token_N.numel()
        timer.lap("experts")
        timer.lap("combine")
        return out_TD, stats
