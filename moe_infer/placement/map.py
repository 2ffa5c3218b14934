"""Where each expert of an MoE layer lives under expert parallelism: global expert id -> (rank, local slot).

    placement = Placement.contiguous(num_experts=8, ranks=2)    rank 0 holds experts 0-3, rank 1 holds 4-7
    placement.local_experts(1)                                   [4, 5, 6, 7]: global ids in local-slot order
    placement.rank_of_E[e], placement.slot_of_E[e]               where expert e runs
    placement.position_of_E[e]                                   rank * L + slot: the expert's place in rank-major order

Every rank holds the same number L = E / R of experts, each in a dense slot 0..L-1, and every expert is placed
exactly once. The dispatchers exchange fixed per-rank blocks of L experts, which is why the counts are equal.
Replicas (one expert on several ranks) are a later step: `from_rank_lists` is where duplicates would be admitted,
with a per-expert choice of copy; everything downstream reads only `rank_of_E`/`slot_of_E`.

Shape legend: E experts, R ranks, L experts per rank (local slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.errors import PipelineError


class PlacementError(PipelineError):
    """A placement that does not put every expert on exactly one rank in a dense local slot."""


@dataclass(frozen=True)
class Placement:
    rank_of_E: torch.Tensor  # int64 [E]: the rank that holds expert e
    slot_of_E: torch.Tensor  # int64 [E]: its slot among that rank's experts
    ranks: int
    _local: list[list[int]] = field(init=False, repr=False, compare=False)
    _position_of_E: torch.Tensor = field(init=False, repr=False, compare=False)
    _identity: bool = field(init=False, repr=False, compare=False)  # expert e at position e (contiguous placements)

    def __post_init__(self):
        rank_of_E = torch.as_tensor(self.rank_of_E, dtype=torch.int64).reshape(-1)
        slot_of_E = torch.as_tensor(self.slot_of_E, dtype=torch.int64).reshape(-1)
        object.__setattr__(self, "rank_of_E", rank_of_E)
        object.__setattr__(self, "slot_of_E", slot_of_E)
        num_experts, ranks = rank_of_E.numel(), self.ranks
        if ranks < 1:
            raise PlacementError(f"placement: ranks must be at least 1, got {ranks}")
        if slot_of_E.numel() != num_experts:
            raise PlacementError(
                f"placement: rank_of_E has {num_experts} entries but slot_of_E has {slot_of_E.numel()} "
                "(one of each per expert)"
            )
        if num_experts == 0:
            raise PlacementError("placement: there are no experts to place")
        bad = ((rank_of_E < 0) | (rank_of_E >= ranks)).nonzero().flatten().tolist()
        if bad:
            raise PlacementError(
                f"placement: expert(s) {bad} are on rank(s) {rank_of_E[bad].tolist()}, outside 0..{ranks - 1}"
            )
        local: list[list[int]] = []
        for rank in range(ranks):
            experts = (rank_of_E == rank).nonzero().flatten()
            slots = slot_of_E[experts]
            if sorted(slots.tolist()) != list(range(experts.numel())):
                raise PlacementError(
                    f"placement: rank {rank} holds experts {experts.tolist()} in slots {slots.tolist()}; "
                    f"expected each of slots 0..{experts.numel() - 1} used once"
                )
            local.append(experts[torch.argsort(slots)].tolist())
        sizes = [len(experts) for experts in local]
        if len(set(sizes)) != 1:
            raise PlacementError(
                f"placement: ranks hold {sizes} experts; every rank must hold the same number ({num_experts} / {ranks})"
            )
        object.__setattr__(self, "_local", local)
        # Read on every MoE call (pair_positions): computed once here.
        object.__setattr__(self, "_position_of_E", rank_of_E * len(local[0]) + slot_of_E)
        object.__setattr__(self, "_identity", torch.equal(self._position_of_E, torch.arange(num_experts)))

    @classmethod
    def contiguous(cls, num_experts: int, ranks: int) -> Placement:
        """Rank r holds experts r*L ... (r+1)*L - 1 in that order (megatron's expert-parallel layout)."""
        if ranks < 1 or num_experts < 1 or num_experts % ranks != 0:
            raise PlacementError(
                f"placement: {num_experts} experts cannot be split evenly over {ranks} ranks "
                "(the number of experts must be a positive multiple of the number of ranks)"
            )
        per_rank = num_experts // ranks
        experts_E = torch.arange(num_experts)
        return cls(rank_of_E=experts_E // per_rank, slot_of_E=experts_E % per_rank, ranks=ranks)

    @classmethod
    def from_rank_lists(cls, experts_per_rank: Sequence[Sequence[int]], num_experts: int) -> Placement:
        """`experts_per_rank[r]` lists rank r's global expert ids in local-slot order."""
        rank_of_E = torch.full((num_experts,), -1, dtype=torch.int64)
        slot_of_E = torch.full((num_experts,), -1, dtype=torch.int64)
        for rank, experts in enumerate(experts_per_rank):
            for slot, expert in enumerate(experts):
                if not 0 <= expert < num_experts:
                    raise PlacementError(f"placement: rank {rank} lists expert {expert}, outside 0..{num_experts - 1}")
                if rank_of_E[expert] >= 0:
                    raise PlacementError(
                        f"placement: expert {expert} is placed twice (ranks {int(rank_of_E[expert])} and {rank}); "
                        "each expert must be placed exactly once"
                    )
                rank_of_E[expert], slot_of_E[expert] = rank, slot
        missing = (rank_of_E < 0).nonzero().flatten().tolist()
        if missing:
            raise PlacementError(f"placement: expert(s) {missing} are not placed on any rank")
        return cls(rank_of_E=rank_of_E, slot_of_E=slot_of_E, ranks=len(experts_per_rank))

    @property
    def num_experts(self) -> int:
        return self.rank_of_E.numel()

    @property
    def experts_per_rank(self) -> int:
        return len(self._local[0])

    @property
    def position_of_E(self) -> torch.Tensor:
        """int64 [E]: rank * L + slot, the order in which the policies lay out per-expert blocks."""
        return self._position_of_E

    @property
    def positions_are_ids(self) -> bool:
        """Whether every expert sits at the position of its own id (pair_positions returns the ids)."""
        return self._identity

    def pair_positions(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """int64 [T*K] (token-major): the position of each (token, expert) pair's expert. One copy per expert here;
        ReplicatedPlacement (moe_infer.placement.replicas) spreads pairs over copies behind the same method."""
        if self._identity:  # every expert at its own id's position: the ids are the positions (a read-only view)
            return experts_TK.reshape(-1)
        return self.position_of_E.to(experts_TK.device).index_select(0, experts_TK.reshape(-1))

    def local_experts(self, rank: int) -> list[int]:
        """Rank `rank`'s global expert ids in local-slot order."""
        if not 0 <= rank < self.ranks:
            raise PlacementError(f"placement: rank {rank} is outside 0..{self.ranks - 1}")
        return list(self._local[rank])
