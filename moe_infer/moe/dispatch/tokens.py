"""How many tokens every rank of the expert-parallel group brings to a forward pass: agreed once per pass, not once
per MoE layer.

    counts = TokenCounts(ranks)                  one per stack of layers (share_token_counts in moe_infer.moe.layer)
    tokens_R = counts.agree(T, device)          the stack's first MoE layer: one all-reduce of R numbers
    tokens_R = counts.read(T)                    every later MoE layer of the same pass: no collective

Every MoE layer of one forward pass of a stack (encoder or decoder) sees the same tokens on each rank (padding is
skipped alike in every layer), so the first MoE layer of the stack agrees on the counts and the others read them.
What the counts decide, the same on every rank: static gating's capacity (from the largest count) and the dynamic
dispatcher's exchange (all-gather for small passes, all-to-all otherwise, and the all-gather's block size). A layer
that leads its own counts (the default: nothing shared) agrees at every call. The dynamic dispatcher's all-gather
skips even the first layer's agreement while the previous pass's counts still fit (`guess`, `learned`).
"""

from __future__ import annotations

import torch

from moe_infer.collectives import all_reduce
from moe_infer.moe.dispatch.exchange import ExpertGroup
from pipeline.errors import PipelineError


class TokenCounts:
    def __init__(self, ranks: ExpertGroup):
        self.ranks = ranks
        self.tokens_R: list[int] | None = None

    def agree(self, tokens: int, device: torch.device) -> list[int]:
        """Every rank's token count (a collective: every rank of the group calls it)."""
        if self.ranks.size == 1:
            self.tokens_R = [tokens]
        else:
            one_hot = [0] * self.ranks.size
            one_hot[self.ranks.rank] = tokens
            self.tokens_R = all_reduce(one_hot, "sum", device=device, group=self.ranks.group)
        return self.tokens_R

    def read(self, tokens: int) -> list[int]:
        """The counts the stack's first MoE layer agreed on in this forward pass."""
        if self.tokens_R is None or self.tokens_R[self.ranks.rank] != tokens:
            agreed = None if self.tokens_R is None else self.tokens_R[self.ranks.rank]
            raise PipelineError(
                f"MoE dispatch: this layer got {tokens} tokens but the first MoE layer of its stack agreed on {agreed} "
                "in this forward pass; every MoE layer of a stack must see the same tokens (share_token_counts links "
                "only the layers of one stack, in the order a forward pass calls them)"
            )
        return self.tokens_R


class Agreement:
    """A dispatcher's view of its stack's counts: `lead` agrees at each call, a follower reads."""

    def __init__(self, ranks: ExpertGroup):
        self.counts, self.lead = TokenCounts(ranks), True

    def follow(self, counts: TokenCounts) -> None:
        self.counts, self.lead = counts, False

    def guess(self) -> list[int] | None:
        """A leader's counts of the previous pass (None: a follower, or no pass yet): the same on every rank, and
        usually this pass's too while decoding. The dynamic dispatcher's all-gather speculates on them."""
        return self.counts.tokens_R if self.lead else None

    def learned(self, tokens_R: list[int]) -> None:
        """A leader's counts of this pass, learned by every rank alike without the agreement's collective."""
        self.counts.tokens_R = list(tokens_R)

    def __call__(self, tokens: int, device: torch.device) -> list[int]:
        return self.counts.agree(tokens, device) if self.lead else self.counts.read(tokens)
