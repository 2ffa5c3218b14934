"""Which local experts sit in a rank's K device slots: the expert cache's state machine, without any weights.

    cache = ExpertCache(slots=2, policy="paper", initial=[0, 1])     starts with experts 0, 1 in slots 0, 1
    cache.step([0, 2, 3])        one MoE call: the active local experts in execution order -> one Access each
        [Access(expert=0, hit=True, slot=0, evicted=None), Access(expert=2, hit=False, slot=..., evicted=...), ...]
    cache.resident               {expert: slot}
    cache.hits, cache.misses, cache.batches
    cache.prefetch([4, 5])       copy predicted experts in before a batch; not an access (cache.prefetches)
    simulate(batches, slots=2, policy="lru", initial=[0, 1]) -> CacheStats(hits, misses, accesses, miss_rate)

A rank holds L local experts in host memory and K <= L of them in device slots. Each batch (one call of one MoE
layer) runs its active experts one after another; an active expert that is not resident is a miss: it is copied
into the lowest free slot, or, with none free, into the slot of the victim its eviction policy picks (policies.py).
The engine's expert store (store.py) does the copying; this module only decides, so policies can be compared on
recorded traces (replay.py) with exactly the decisions the engine would make.

`future` is the whole sequence of batches still to come. Belady's MIN needs it; any policy may be given it, and
then every `step` is checked against it, so a replay that drifts from its recording fails loudly.

Shape legend: K device slots, L local experts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from moe_infer.buffering.policies import CacheView, EvictionPolicy, make_policy
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Access:
    expert: int  # local expert id (0..L-1)
    hit: bool
    slot: int  # device slot (0..K-1) the expert occupies after this access
    evicted: int | None  # the expert that was in `slot` before (None on a hit, or when the slot was empty)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    accesses: int
    miss_rate: float  # misses / accesses (0.0 for no accesses)


class ExpertCache:
    def __init__(
        self,
        slots: int,
        policy: str | EvictionPolicy,
        initial: Sequence[int] = (),
        future: Sequence[Sequence[int]] | None = None,
    ):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise PipelineError(f"expert cache: slots must be an integer >= 1, got {slots!r}")
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        if self.policy.needs_future and future is None:
            raise PipelineError(
                f"expert cache: policy {self.policy.name!r} is an offline oracle (Belady's MIN): it needs the recorded "
                "trace of every batch to come (future=...); use it to replay a trace, not to serve"
            )
        initial = [int(e) for e in initial]
        _check_batch(initial, "initial experts")
        if len(initial) > slots:
            raise PipelineError(f"expert cache: {len(initial)} initial experts {initial} do not fit in {slots} slots")
        self.slots = slots
        self.hits = self.misses = self.batches = 0
        self.prefetches = 0  # copies made by prefetch(), outside any batch
        self._slot_of: dict[int, int] = {}
        self._free = deque(range(len(initial), slots))  # never grows back: a slot is emptied only to be refilled
        self._clock = 0
        self._inserted_at: dict[int, int] = {}
        self._last_used: dict[int, int] = {}
        self._uses: dict[int, int] = {}
        self._needed_later: set[int] = set()
        for slot, expert in enumerate(initial):
            self._slot_of[expert] = slot
            self._inserted_at[expert] = self._last_used[expert] = self._tick()
        self._future = None if future is None else [[int(e) for e in batch] for batch in future]
        self._next_at: dict[int, deque[int]] = {}  # expert -> its positions still to come in the flattened future
        for i, batch in enumerate(self._future or []):
            _check_batch(batch, f"future batch {i}")
        for position, expert in enumerate(e for batch in self._future or [] for e in batch):
            self._next_at.setdefault(expert, deque()).append(position)
        self._view = CacheView(self._inserted_at, self._last_used, self._uses, self._needed_later, self._next_use)

    @property
    def resident(self) -> dict[int, int]:
        """expert -> device slot, for every expert now in a slot."""
        return dict(self._slot_of)

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    def step(self, active: Sequence[int]) -> list[Access]:
        """One batch: `active` lists the distinct active local experts in execution order (the engine runs them in
        ascending local slot order). Returns one Access per active expert, in that order."""
        active = [int(e) for e in active]
        _check_batch(active, f"batch {self.batches}")
        if self._future is not None:
            if self.batches >= len(self._future):
                raise PipelineError(
                    f"expert cache: batch {self.batches} is beyond the recorded future ({len(self._future)} batches)"
                )
            if active != self._future[self.batches]:
                raise PipelineError(
                    f"expert cache: batch {self.batches} runs experts {active}, but the recorded future has "
                    f"{self._future[self.batches]}: the replay has diverged from its trace"
                )
        self._needed_later.clear()
        self._needed_later.update(active)
        accesses = [self._access(expert) for expert in active]
        self.batches += 1
        return accesses

    def prefetch(self, experts: Sequence[int], policy: EvictionPolicy | None = None) -> list[Access]:
        """Copy the non-resident `experts` into slots before the batch predicted to need them (prefetch.py issues
        them while the previous MoE layer computes). Not an access: hits, misses and use counts are untouched, so
        the next `step` reports only the on-demand misses; each copy counts in `prefetches`. Victims are picked
        among the cached experts outside `experts` (so a prefetch never evicts an expert predicted to run) by
        `policy` when given (a predictor's own ranking), else by the cache's. Returns one Access (hit=False) per
        copy, in the order given."""
        experts = [int(e) for e in experts]
        _check_batch(experts, "prefetch")
        policy = policy or self.policy
        for oracle in (p for p in (self.policy, policy) if p.needs_future):
            # Belady's MIN is the demand-loading optimum; letting it prefetch would measure a different oracle.
            raise PipelineError(f"expert cache: policy {oracle.name!r} is a replay oracle; it does not prefetch")
        if len(experts) > self.slots:
            raise PipelineError(f"expert cache: {len(experts)} prefetched experts {experts} exceed {self.slots} slots")
        copies = []
        for expert in experts:
            if expert in self._slot_of:
                continue
            evicted = None
            if self._free:
                slot = self._free.popleft()
            else:
                evicted = policy.victim([e for e in self._slot_of if e not in experts], self._view)
                slot = self._slot_of.pop(evicted)
                del self._inserted_at[evicted], self._last_used[evicted]
            self._slot_of[expert] = slot
            # A load counts as a use, as for the initial experts, so lru/lfu rank it like a fresh arrival.
            self._inserted_at[expert] = self._last_used[expert] = self._tick()
            self.prefetches += 1
            copies.append(Access(expert, hit=False, slot=slot, evicted=evicted))
        return copies

    def _access(self, expert: int) -> Access:
        # Removed before the decision: the policy sees only the experts that run *after* this one.
        self._needed_later.discard(expert)
        if self._future is not None:
            self._next_at[expert].popleft()
        self._uses[expert] = self._uses.get(expert, 0) + 1
        if expert in self._slot_of:
            self.hits += 1
            self._last_used[expert] = self._tick()
            return Access(expert, hit=True, slot=self._slot_of[expert], evicted=None)
        self.misses += 1
        evicted = None
        if self._free:
            slot = self._free.popleft()
        else:
            evicted = self.policy.victim(list(self._slot_of), self._view)
            if evicted not in self._slot_of:
                raise PipelineError(f"eviction policy {self.policy!r} chose expert {evicted}, which is not cached")
            slot = self._slot_of.pop(evicted)
            del self._inserted_at[evicted], self._last_used[evicted]
        self._slot_of[expert] = slot
        self._inserted_at[expert] = self._last_used[expert] = self._tick()
        return Access(expert, hit=False, slot=slot, evicted=evicted)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _next_use(self, expert: int) -> float:
        if self._future is None:
            raise PipelineError("expert cache: next use asked for, but the cache was given no recorded future")
        upcoming = self._next_at.get(expert)
        return upcoming[0] if upcoming else math.inf


def simulate(
    batches: Sequence[Sequence[int]], slots: int, policy: str | EvictionPolicy, initial: Sequence[int] = ()
) -> CacheStats:
    """Replay `batches` (each: active experts in execution order) through one cache; the batches are also its future,
    so belady works here and every policy is checked against the same trace."""
    batches = [list(batch) for batch in batches]
    cache = ExpertCache(slots, policy, initial=initial, future=batches)
    for batch in batches:
        cache.step(batch)
    accesses = cache.accesses
    return CacheStats(cache.hits, cache.misses, accesses, cache.misses / accesses if accesses else 0.0)


def _check_batch(experts: list[int], what: str) -> None:
    negative = [e for e in experts if e < 0]
    if negative:
        raise PipelineError(f"expert cache: {what} {experts} has negative expert id(s) {negative}")
    if len(set(experts)) != len(experts):
        twice = sorted({e for e in experts if experts.count(e) > 1})
        raise PipelineError(f"expert cache: {what} {experts} lists expert(s) {twice} more than once")
