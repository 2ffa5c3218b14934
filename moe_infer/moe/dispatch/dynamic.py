"""Dynamic dispatch (the paper's dynamic gating): sort the (token, expert) pairs, count them per expert, and send
exactly the routed rows with a variable-size all-to-all. Nothing is padded, nothing is dropped.

    dispatch  1. pairs sorted (stable) by the position rank * L + slot of their expert; counts_P = bincount per position
              2. all-to-all of counts_P (int64 [E], R blocks of L): each rank learns recv_RL, rows it gets per source
                 x slot
              3. variable all-to-all of the sorted rows and their probabilities, split by those counts
              4. received rows arrive source-major; regroup them by local slot, so each expert runs on one contiguous
                 slice (the experts write their outputs into the matching slice of one buffer)
    combine   5. un-group, reverse all-to-all, sum each token's pairs with index_add_ into [T, D]
With one rank (every expert local) nothing is exchanged: the sorted pairs' rows are gathered, the experts run, and
their outputs are added into their tokens' rows (Local).

Shape legend: T tokens, K experts per token, D model dim, N local pairs (T*K), M rows received, E experts,
P expert positions (rank-major, E of them), R ranks, L experts per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_infer.moe.dispatch.exchange import ExpertGroup
from moe_infer.moe.experts import Rows
from moe_infer.moe.stats import PhaseTimer
from moe_infer.placement import Placement


@dataclass
class Exchanged:
    """This rank's rows after the exchange, grouped by local slot (rows), and how to send their outputs back."""

    rows: Rows
    group_M: torch.Tensor  # received row order -> slot order
    send_R: list[int]
    recv_R: list[int]
    token_N: torch.Tensor  # the token of each sorted local pair
    num_tokens: int
    timer: PhaseTimer


@dataclass
class Local:
    """One rank, every expert local: the pairs' rows gathered in expert order (rows); their outputs are added into
    out_TD by token."""

    rows: Rows
    out_TD: torch.Tensor
    token_N: torch.Tensor


class DynamicDispatch:
    def __init__(self, placement: Placement, group: dist.ProcessGroup | None = None):
        self.placement = placement
        self.ranks = ExpertGroup(placement, group)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        probs_TK: torch.Tensor,
        experts_TK: torch.Tensor,
        prepare: Callable[[list[int], bool], None],
        timer: PhaseTimer,
    ) -> Exchanged | Local:
        """This rank's rows for its local experts; `prepare(active_L, overlapped)` is told which slots will run
        (while the rows travel, when they do)."""
        num_tokens, topk = experts_TK.shape
        R, L = self.placement.ranks, self.placement.experts_per_rank
        stats = timer.stats

        # 1. Positions are rank-major, so one stable sort groups the pairs by destination rank, then by local slot.
        position_N = self.placement.pair_positions(experts_TK)  # with replicas, a hot expert's pairs are spread
        order_N = torch.argsort(position_N, stable=True)
        token_N = torch.div(order_N, topk, rounding_mode="floor")  # pair n is (token n // K, choice n % K)
        counts_P = torch.bincount(position_N, minlength=R * L)
        timer.lap("gate")
        if R == 1:
            probs_N = probs_TK.reshape(-1).float().index_select(0, order_N)
            x_ND = x_TD.index_select(0, token_N)
            rows = Rows(x_ND, probs_N, counts_P.tolist(), torch.empty_like(x_ND))
            prepare(rows.active_L, False)
            stats.expert_rows = token_N.numel()
            timer.lap("dispatch")
            return Local(rows, torch.zeros_like(x_TD), token_N)

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
        prepare([slot for slot, rows in enumerate(rows_L) if rows], True)
        x_MD = rows_in_flight.wait().index_select(0, group_M)
        probs_M = probs_in_flight.wait().index_select(0, group_M)
        # Each expert writes its rows' outputs straight into its slice of one buffer (no concatenation after).
        y_MD = torch.empty_like(x_MD)
        stats.expert_rows = y_MD.shape[0]
        timer.lap("dispatch")
        return Exchanged(Rows(x_MD, probs_M, rows_L, y_MD), group_M, send_R, recv_R, token_N, num_tokens, timer)

    def combine(self, routed: Exchanged | Local) -> torch.Tensor:
        """[T, D]: each token's expert outputs, summed."""
        if isinstance(routed, Local):
            return routed.out_TD.index_add_(0, routed.token_N, routed.rows.y_MD)
        # 5. Undo the grouping, send each row back to the rank that owns its token, and sum each token's pairs.
        y_MD = torch.empty_like(routed.rows.y_MD).index_copy_(0, routed.group_M, routed.rows.y_MD)
        y_ND = self.ranks.all_to_all(y_MD, routed.recv_R, routed.send_R, routed.timer.stats)
        out_TD = torch.zeros(routed.num_tokens, y_ND.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
        return out_TD.index_add_(0, routed.token_N, y_ND)
