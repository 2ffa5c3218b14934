"""A placement in which hot experts have copies on several ranks (beyond the paper: DeepSeek's / vLLM's EPLB idea).

    placement = ReplicatedPlacement.from_rank_lists([[0, 1, 2], [3, 0, 4]], num_experts=5)   expert 0 on both ranks
    placement.local_experts(1)              [3, 0, 4]: rank 1's slots (ranks may hold different numbers of them)
    placement.pair_positions(experts_TK)    int64 [T*K]: rank * S + slot of the copy each (token, expert) pair uses

Dynamic dispatch needs nothing else: it sorts pairs by position, exchanges per-position counts and runs
each local slot's expert, so a copy is just another position. Positions are rank * S + slot with S the most slots
any rank holds; a rank with fewer slots simply never receives rows for the ones it lacks.

Which copy a pair uses: token t goes to copy t mod (copies of its expert), so an expert's tokens are split evenly
across its copies whatever the batch, and a token's choice depends only on its index (deterministic, no
communication).

Shape legend: T tokens, K experts per token, E experts, R ranks, S slots per rank, C copies (at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moe_infer.placement.map import PlacementError


@dataclass(frozen=True)
class ReplicatedPlacement:
    slots: tuple[tuple[int, ...], ...]  # slots[r][s]: the global expert in rank r's slot s
    num_experts: int
    _positions_EC: torch.Tensor = field(init=False, repr=False, compare=False)  # copy c of expert e -> position
    _copies_E: torch.Tensor = field(init=False, repr=False, compare=False)

    @classmethod
    def from_rank_lists(cls, experts_per_rank: Sequence[Sequence[int]], num_experts: int) -> ReplicatedPlacement:
        return cls(slots=tuple(tuple(int(e) for e in rank) for rank in experts_per_rank), num_experts=num_experts)

    def __post_init__(self):
        sizes = [len(rank) for rank in self.slots]
        if not sizes or min(sizes) == 0:
            raise PlacementError(f"placement: ranks hold {sizes} experts; every rank must hold at least one")
        width = max(sizes)
        copies: list[list[int]] = [[] for _ in range(self.num_experts)]
        for rank, experts in enumerate(self.slots):
            if len(set(experts)) != len(experts):
                raise PlacementError(f"placement: rank {rank} holds an expert twice ({list(experts)})")
            for slot, expert in enumerate(experts):
                if not 0 <= expert < self.num_experts:
                    raise PlacementError(
                        f"placement: rank {rank} lists expert {expert}, outside 0..{self.num_experts - 1}"
                    )
                copies[expert].append(rank * width + slot)
        missing = [e for e, c in enumerate(copies) if not c]
        if missing:
            raise PlacementError(f"placement: expert(s) {missing} are not placed on any rank")
        most = max(map(len, copies))
        positions_EC = torch.tensor([c + [c[0]] * (most - len(c)) for c in copies], dtype=torch.int64)
        object.__setattr__(self, "_positions_EC", positions_EC)
        object.__setattr__(self, "_copies_E", torch.tensor([len(c) for c in copies], dtype=torch.int64))

    @property
    def ranks(self) -> int:
        return len(self.slots)

    @property
    def experts_per_rank(self) -> int:
        """Slots per rank (S): the most local experts (copies included) any rank holds."""
        return max(map(len, self.slots))

    def copies(self, expert: int) -> int:
        return int(self._copies_E[expert])

    def local_experts(self, rank: int) -> list[int]:
        if not 0 <= rank < self.ranks:
            raise PlacementError(f"placement: rank {rank} is outside 0..{self.ranks - 1}")
        return list(self.slots[rank])

    positions_are_ids = False  # a pair's position depends on its token too (the copies of an expert share its pairs)

    def pair_positions(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """int64 [T*K] (token-major, as experts_TK.reshape(-1)): the position of the copy each pair goes to."""
        num_tokens, topk = experts_TK.shape
        expert_N = experts_TK.reshape(-1)
        token_N = torch.arange(num_tokens, device=experts_TK.device).repeat_interleave(topk)
        copy_N = token_N % self._copies_E.to(expert_N.device)[expert_N]
        return self._positions_EC.to(expert_N.device)[expert_N, copy_N]
