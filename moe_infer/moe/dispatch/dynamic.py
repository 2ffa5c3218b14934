"""Dynamic dispatch (the paper's dynamic gating): sort the (token, expert) pairs, count them per expert, and move
exactly the routed rows. Nothing is padded, nothing is dropped.

Two exchanges, chosen per forward pass from the token counts the ranks agreed on (tokens.py; or, for the all-gather,
the previous pass's counts: see below), so every rank picks the same one (MOE_DISPATCH=all-to-all|all-gather forces
one, auto is the default):
    all-to-all  the paper's, for large passes. 3 collectives per layer.
        1. pairs sorted (stable) by the position rank * L + slot of their expert; counts_P = bincount per position
        2. all-to-all of counts_P (int64 [E], R blocks of L): each rank learns recv_RL, rows it gets per source x slot
        3. variable all-to-all of the sorted rows, each with its probability in an extra column
        4. received rows arrive source-major; regroup them by local slot, so each expert runs on one contiguous slice
        5. combine: un-group, reverse all-to-all, sum each token's pairs with index_add_ into [T, D]
    all-gather  for small passes (ALL_GATHER_MAX_TOKENS). 2 collectives per layer, no count exchange.
        1. every rank's tokens to every rank, each with its K expert positions and probabilities in extra columns:
           one all-gather of blocks of T_max rows (the largest count) and a header row with the rank's own count.
           T_max is the previous pass's while it fits (decoding: the same batch step after step), so a pass needs
           no token-count agreement (tokens.py) at all: every rank reads the real counts from the headers, and when
           a rank's tokens did not fit the block, all ranks gather again with the right one.
        2. each rank takes the pairs of its own experts from all of them, sorted by local slot (padding and
           headers carry the expert position -1: nobody's)
        3. combine: each rank's partial sums for every token of the group, one all-to-all of [T_max, D] blocks,
           summed per token
       Each token travels once instead of once per pair (K times), and its outputs come back once per rank: at
       R = 2, K = 2 about the bytes of the all-to-all, with one collective less and no wait for the counts.
With one rank (every expert local) nothing is exchanged: the sorted pairs' rows are gathered, the experts run, and
each token's outputs are summed from their rows in one pass (Local; routing_kernels.sum_pairs). Where every expert
sits at its own id, the router, the sort and the gather are one compiled call (route_local: Router.grouped).

Shape legend: T tokens, K experts per token, D model dim, N local pairs (T*K), M rows received, E experts,
P expert positions (rank-major, E of them), R ranks, L experts per rank, A gathered rows (R * T_max), W row width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_infer.model.moe import Router
from moe_infer.model.routing_kernels import sort_pairs, sum_pairs
from moe_infer.moe.dispatch.exchange import ExpertGroup, as_columns, from_columns
from moe_infer.moe.dispatch.tokens import Agreement
from moe_infer.moe.experts import Rows
from moe_infer.moe.stats import PhaseTimer
from moe_infer.placement import Placement
from pipeline.errors import env_choice

ENV = "MOE_DISPATCH"
EXCHANGES = ("auto", "all-to-all", "all-gather")
ALL_GATHER_MAX_TOKENS = 256  # tokens over the whole group up to which the all-gather is used (measured: see README)


@dataclass
class Exchanged:
    """This rank's rows after the all-to-all, grouped by local slot (rows), and how to send their outputs back."""

    rows: Rows
    group_M: torch.Tensor  # received row order -> slot order
    send_R: list[int]
    recv_R: list[int]
    token_N: torch.Tensor  # the token of each sorted local pair
    num_tokens: int
    timer: PhaseTimer


@dataclass
class Gathered:
    """This rank's rows picked from every rank's tokens (rows), and the gathered row each came from."""

    rows: Rows
    token_M: torch.Tensor  # the gathered row (source rank * block + its token) of each row
    block: int  # rows per rank in the gathered buffer (the largest token count, and the header row)
    num_tokens: int
    timer: PhaseTimer


@dataclass
class Local:
    """One rank, every expert local: the pairs' rows gathered in expert order (rows); each token's outputs are summed
    from their places."""

    rows: Rows
    place_N: torch.Tensor  # the row of each pair (token-major) in rows
    topk: int
    experts_TK: torch.Tensor | None = None  # the router's choice, when the dispatcher ran the router (route_local)


def row_width(hidden: int, extra: int, dtype: torch.dtype) -> int:
    """Columns of a row of `hidden` values and `extra` more, rounded up to a 16-byte multiple (the row stride that
    grouped GEMM kernels accept for the x part read in place)."""
    per_16 = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-(hidden + extra) // per_16) * per_16


def chosen_exchange() -> str:
    return env_choice(ENV, EXCHANGES)


class DynamicDispatch:
    speculate = True  # the all-gather's block from the previous pass's counts (see dispatch); False: agree first

    def __init__(self, placement: Placement, group: dist.ProcessGroup | None = None):
        self.placement = placement
        self.ranks = ExpertGroup(placement, group)
        self.tokens = Agreement(self.ranks)
        self.exchange = chosen_exchange()

    def uses_all_gather(self, tokens_R: list[int]) -> bool:
        if self.exchange != "auto":
            return self.exchange == "all-gather"
        return sum(tokens_R) <= ALL_GATHER_MAX_TOKENS

    def dispatch(
        self,
        x_TD: torch.Tensor,
        probs_TK: torch.Tensor,
        experts_TK: torch.Tensor,
        prepare: Callable[[list[int], bool], None],
        timer: PhaseTimer,
    ) -> Exchanged | Gathered | Local:
        """This rank's rows for its local experts; `prepare(active_L, overlapped)` is told which slots will run
        (while the rows travel, when they do)."""
        position_N = self.placement.pair_positions(experts_TK)  # with replicas, a hot expert's pairs are spread
        if self.ranks.size == 1:
            return self._local(x_TD, probs_TK, position_N, prepare, timer)
        guess_R = self.tokens.guess() if self.speculate else None
        if guess_R is not None and max(guess_R) > 0 and self.uses_all_gather(guess_R):
            # The previous pass's counts (the same on every rank) as this pass's block: no count agreement. The
            # headers tell every rank the real counts; when a rank's tokens did not fit, all go on with those.
            gathered = self._all_gather(x_TD, probs_TK, position_N, max(guess_R), prepare, timer, guessed=True)
            if gathered is not None:
                return gathered
            tokens_R = self.tokens.counts.tokens_R
        else:
            tokens_R = self.tokens(x_TD.shape[0], x_TD.device)
        if self.uses_all_gather(tokens_R):
            return self._all_gather(x_TD, probs_TK, position_N, max(tokens_R), prepare, timer)
        return self._all_to_all(x_TD, probs_TK, position_N, prepare, timer)

    def route_local(self, x_TD: torch.Tensor, router: Router, prepare, timer: PhaseTimer) -> Local | None:
        """One rank holding every expert at its own id: the router's choice, the sort and the row gather in one
        compiled call (Router.grouped; its time is the gate phase's, the dispatch phase is only the hand-over), for
        the caller instead of router + dispatch. None where that does not run (then the caller goes the usual way)."""
        if self.ranks.size != 1 or not self.placement.positions_are_ids or x_TD.dtype != torch.float32:
            return None
        routed = router.grouped(x_TD)
        if routed is None:
            return None
        timer.lap("gate")
        topk = routed.experts_TK.shape[1]
        return _hand_over(
            routed.x_ND, routed.probs_N, routed.counts_E, routed.place_N, topk, prepare, timer, routed.experts_TK
        )

    def _local(self, x_TD, probs_TK, position_N, prepare, timer) -> Local:
        # pair n: token n // K, choice n % K
        topk = probs_TK.shape[1]
        pairs = sort_pairs(position_N, self.placement.experts_per_rank, topk)
        timer.lap("gate")
        # (index_select: a plain row gather, several times faster than x[idx] on CPU.)
        x_ND = x_TD.index_select(0, pairs.token_N)
        probs_N = probs_TK.reshape(-1).float().index_select(0, pairs.order_N)
        return _hand_over(x_ND, probs_N, pairs.counts_P, pairs.place_N, topk, prepare, timer)

    def _all_to_all(self, x_TD, probs_TK, position_N, prepare, timer) -> Exchanged:
        (num_tokens, D), topk = x_TD.shape, probs_TK.shape[1]
        R, L = self.placement.ranks, self.placement.experts_per_rank
        stats = timer.stats
        # 1. Positions are rank-major, so one stable sort groups the pairs by destination rank, then by local slot.
        order_N, token_N, counts_P, _ = sort_pairs(position_N, R * L, topk)
        timer.lap("gate")

        # 2. Counts first: the row exchange needs both its split lists, and the receiver cannot know its own. As the
        # paper says, the count exchange starts as soon as the counts exist and the rows are gathered meanwhile.
        counts_in_flight = self.ranks.start_all_to_all(counts_P, [L] * R, [L] * R, stats)
        # Each row carries its probability (fp32, bit for bit) in extra columns: one exchange for both.
        probs_N1 = as_columns(probs_TK.reshape(-1, 1).float().index_select(0, order_N), x_TD.dtype)
        payload_NW = x_TD.new_empty(token_N.numel(), row_width(D, probs_N1.shape[1], x_TD.dtype))
        torch.index_select(x_TD, 0, token_N, out=payload_NW[:, :D])
        payload_NW[:, D : D + probs_N1.shape[1]] = probs_N1
        send_R = counts_P.view(R, L).sum(1).tolist()
        recv_RL = counts_in_flight.wait().view(R, L)
        recv_R = recv_RL.sum(1).tolist()

        # 3. Exactly the routed rows. While they travel, work out how to regroup what arrives.
        rows_in_flight = self.ranks.start_all_to_all(payload_NW, send_R, recv_R, stats)
        # 4. Row m came from source s for slot l; a stable sort by slot keeps the sources in order within an expert.
        slot_M = torch.arange(L).repeat(R).repeat_interleave(recv_RL.reshape(-1)).to(x_TD.device)
        group_M = torch.argsort(slot_M, stable=True)
        rows_L = recv_RL.sum(0).tolist()
        # A buffered expert store copies in the missing active experts while the rows travel.
        prepare([slot for slot, rows in enumerate(rows_L) if rows], True)
        received_MW = rows_in_flight.wait().index_select(0, group_M)
        x_MD = received_MW[:, :D]
        probs_M = from_columns(received_MW[:, D : D + probs_N1.shape[1]], torch.float32).reshape(-1)
        # The experts write their rows' outputs straight into one buffer (no concatenation after).
        rows = Rows(x_MD, probs_M, rows_L, torch.empty(x_MD.shape, dtype=x_MD.dtype, device=x_MD.device))
        stats.expert_rows = x_MD.shape[0]
        timer.lap("dispatch")
        return Exchanged(rows, group_M, send_R, recv_R, token_N, num_tokens, timer)

    def _all_gather(self, x_TD, probs_TK, position_N, block, prepare, timer, guessed=False) -> Gathered | None:
        """`guessed`: `block` is the previous pass's, not agreed; None when a rank brought more tokens than that
        (every rank learns the counts from the headers alike, and the caller goes on with them)."""
        (num_tokens, D), topk = x_TD.shape, probs_TK.shape[1]
        L, me, R = self.placement.experts_per_rank, self.ranks.rank, self.ranks.size
        stats = timer.stats
        if block == 0:  # no rank brought a token (every rank knows it from the counts): nothing to exchange
            prepare([], False)
            return Gathered(Rows(x_TD, x_TD.new_zeros(0), [0] * L, x_TD), position_N, 0, 0, timer)
        # 1. This rank's tokens, each with its K probabilities and K expert positions, padded to the block, and a
        # header row with the rank's token count. Padding and the header have positions -1: no rank's experts.
        sent = min(num_tokens, block)
        probs_TC = as_columns(probs_TK[:sent].float(), x_TD.dtype)
        width = probs_TC.shape[1]
        payload_BW = x_TD.new_empty(block + 1, row_width(D, 2 * width, x_TD.dtype))
        payload_BW[:sent, :D] = x_TD[:sent]
        payload_BW[:sent, D : D + width] = probs_TC
        positions_TK = position_N.view(num_tokens, topk)[:sent].to(torch.int32)
        payload_BW[:sent, D + width : D + 2 * width] = as_columns(positions_TK, x_TD.dtype)
        payload_BW[sent:].zero_()
        unused_PK = torch.full((block + 1 - sent, topk), -1, dtype=torch.int32, device=x_TD.device)
        payload_BW[sent:, D + width : D + 2 * width] = as_columns(unused_PK, x_TD.dtype)
        header = as_columns(torch.tensor([[num_tokens]], dtype=torch.int32, device=x_TD.device), x_TD.dtype)
        payload_BW[block, : header.shape[1]] = header
        timer.lap("gate")
        gathered_AW = self.ranks.start_all_gather(payload_BW, stats).wait()

        # Every rank's count, from the headers: the counts of this pass, agreed without a collective of their own.
        headers_RW = gathered_AW.view(R, block + 1, -1)[:, block, : header.shape[1]]
        tokens_R = from_columns(headers_RW, torch.int32).reshape(-1).tolist()
        if guessed:
            self.tokens.learned(tokens_R)
            if max(tokens_R) > block:
                return None
        # 2. The pairs of this rank's experts among every rank's tokens, by local slot (the others' pairs, padding
        # and headers sorted past the end: key L).
        x_AD = gathered_AW[:, :D]
        probs_AK = from_columns(gathered_AW[:, D : D + width], torch.float32)
        position_AK = from_columns(gathered_AW[:, D + width : D + 2 * width], torch.int32)
        mine_AK = torch.div(position_AK, L, rounding_mode="floor") == me
        key_N = torch.where(mine_AK, position_AK - me * L, L).reshape(-1)
        order_AK, token_AK, counts_L1, _ = sort_pairs(key_N.long(), L + 1, topk)
        rows_L = counts_L1.tolist()[:L]
        mine = sum(rows_L)  # the others' pairs sort last (key L)
        pair_M, token_M = order_AK[:mine], token_AK[:mine]
        prepare([slot for slot, rows in enumerate(rows_L) if rows], False)
        x_MD = x_AD.index_select(0, token_M)
        rows = Rows(x_MD, probs_AK.reshape(-1).index_select(0, pair_M), rows_L, torch.empty_like(x_MD))
        stats.expert_rows = x_MD.shape[0]
        timer.lap("dispatch")
        return Gathered(rows, token_M, block + 1, num_tokens, timer)

    def combine(self, routed: Exchanged | Gathered | Local) -> torch.Tensor:
        """[T, D]: each token's expert outputs, summed."""
        if isinstance(routed, Local):
            return sum_pairs(routed.rows.y_MD, routed.place_N, routed.topk)
        y_MD = routed.rows.y_MD
        if isinstance(routed, Gathered):
            if routed.block == 0:
                return y_MD
            # 3. This rank's share of every token's sum, back to the token's rank, and the ranks' shares summed.
            R, block = self.ranks.size, routed.block
            partial_AD = y_MD.new_zeros(R * block, y_MD.shape[1]).index_add_(0, routed.token_M, y_MD)
            back_AD = self.ranks.all_to_all(partial_AD, [block] * R, [block] * R, routed.timer.stats)
            return back_AD.view(R, block, -1).sum(0)[: routed.num_tokens]
        # 5. Undo the grouping, send each row back to the rank that owns its token, and sum each token's pairs.
        y_MD = torch.empty_like(y_MD).index_copy_(0, routed.group_M, y_MD)
        y_ND = self.ranks.all_to_all(y_MD, routed.recv_R, routed.send_R, routed.timer.stats)
        out_TD = torch.zeros(routed.num_tokens, y_ND.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
        return out_TD.index_add_(0, routed.token_N, y_ND)


def _hand_over(x_ND, probs_N, counts_L, place_N, topk, prepare, timer: PhaseTimer, experts_TK=None) -> Local:
    """One rank's grouped rows to its experts (the end of both one-rank paths): their Rows with an output buffer, the
    expert store told which slots run, the dispatch phase closed."""
    rows = Rows(x_ND, probs_N, counts_L.tolist(), torch.empty_like(x_ND))
    prepare(rows.active_L, False)
    timer.stats.expert_rows = x_ND.shape[0]
    timer.lap("dispatch")
    return Local(rows, place_N, topk, experts_TK)
