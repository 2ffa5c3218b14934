"""Eviction policies for the expert cache: which cached expert gives up its device slot when a miss finds none free.

    policy = make_policy("paper")                     one of POLICIES
    victim = policy.victim(cached, view)              cached: the experts now in device slots (never the one loading)

A policy is a pure function of the cache's bookkeeping, handed to it as a `CacheView` (kept by `ExpertCache`):

    view.inserted_at[e]   clock tick at which e was last copied in (initial experts: in the order they were loaded)
    view.last_used[e]     clock tick of e's last access, hit or miss-load (an initial expert's load counts as its use)
    view.uses[e]          accesses of e since the start of the run, kept across evictions (0 for never accessed)
    view.needed_later     the active experts still to run after the current one in this batch
    view.next_use(e)      e's next position in the flattened recorded future (math.inf: never again); only with
                          a recorded future, which is why belady is an offline oracle

The clock ticks once per initial load and once per access, so every tick is unique and ties on time cannot occur.
Each decision reads the view for the K cached experts only: O(K), no per-policy state to keep in step.

The policies (victim among the cached experts):
    paper   the paper's: the experts not needed again in the rest of this batch (already ran, or inactive in it)
            first; among those Last-In-First-Out (the most recently inserted). Local experts run in increasing id
            order, so the last one inserted is the one whose next use is furthest away in a sweep. When every
            cached expert is still needed later in this batch, LIFO over all of them.
    fifo    the earliest inserted.
    lru     the least recently used.
    lfu     the fewest accesses since the start of the run; counts survive eviction, so this measures an expert's
            popularity rather than its use during its current stay (a per-stay count would make every newcomer the
            next victim). Ties: the least recently used.
    belady  Belady's MIN: the expert whose next access (rest of this batch, then later batches) is farthest away;
            never used again is infinitely far. Ties: the lowest expert id. Optimal for demand loading, so it is
            the floor the others are measured against; it needs the whole trace in advance.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from pipeline.errors import PipelineError

POLICIES = ("paper", "fifo", "lru", "lfu", "belady")
ONLINE_POLICIES = POLICIES[:-1]  # what the engine can serve with: belady needs the future, so it only replays


@dataclass(frozen=True)
class CacheView:
    """What a policy may read about the cache's past (and, for belady, its future). Live views of the cache's own
    state: read them during `victim`, do not keep them."""

    inserted_at: Mapping[int, int]
    last_used: Mapping[int, int]
    uses: Mapping[int, int]
    needed_later: Collection[int]
    next_use: Callable[[int], float]


class EvictionPolicy:
    """Picks a victim among `cached` (non-empty, never holding the expert being loaded)."""

    name: str = ""
    needs_future = False  # True: only usable with a recorded future (ExpertCache(..., future=...))

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PaperPolicy(EvictionPolicy):
    name = "paper"

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        done = [e for e in cached if e not in view.needed_later]
        return max(done or cached, key=view.inserted_at.__getitem__)


class FifoPolicy(EvictionPolicy):
    name = "fifo"

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        return min(cached, key=view.inserted_at.__getitem__)


class LruPolicy(EvictionPolicy):
    name = "lru"

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        return min(cached, key=view.last_used.__getitem__)


class LfuPolicy(EvictionPolicy):
    name = "lfu"

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        return min(cached, key=lambda e: (view.uses.get(e, 0), view.last_used[e]))


class BeladyPolicy(EvictionPolicy):
    name = "belady"
    needs_future = True

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        return max(cached, key=lambda e: (view.next_use(e), -e))


_BY_NAME: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (PaperPolicy, FifoPolicy, LruPolicy, LfuPolicy, BeladyPolicy)
}


def make_policy(name: str) -> EvictionPolicy:
    """The policy called `name` (one of POLICIES)."""
    if name not in _BY_NAME:
        raise PipelineError(f"unknown eviction policy {name!r}; expected one of {', '.join(POLICIES)}")
    return _BY_NAME[name]()
