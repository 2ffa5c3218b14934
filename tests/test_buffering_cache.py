"""Expert cache: each policy's eviction order on hand-worked traces, Belady's MIN against exhaustive search, the
Access records' consistency, bad input (the replay study built on it: test_bench_replay.py)."""

from __future__ import annotations

import functools
import random

import pytest

from moe_infer.buffering import POLICIES, Access, ExpertCache, make_policy, simulate
from pipeline.errors import PipelineError


def _run(policy, batches, slots, initial=(), future=None):
    cache = ExpertCache(slots, policy, initial=initial, future=future)
    return cache, [cache.step(batch) for batch in batches]


def _misses(steps):
    """(expert, evicted) for every miss, in order."""
    return [(a.expert, a.evicted) for accesses in steps for a in accesses if not a.hit]


# ---- each policy's eviction order -----------------------------------------------------------------------------------


def test_paper_prefers_experts_not_needed_later_in_the_batch_over_lifo():
    # K=2, experts 0 then 3 loaded at start (3 is the last inserted). Batch [1, 2, 3]:
    #   1 misses: 3 is still needed in this batch, 0 is not -> evict 0 (plain LIFO would have evicted 3); slot 0
    #   2 misses: cached {1, 3}, 3 still needed -> evict 1; slot 0
    #   3 hits (slot 1)
    cache, steps = _run("paper", [[1, 2, 3]], slots=2, initial=[0, 3])
    assert steps == [
        [
            Access(1, hit=False, slot=0, evicted=0),
            Access(2, hit=False, slot=0, evicted=1),
            Access(3, hit=True, slot=1, evicted=None),
        ]
    ]
    assert cache.resident == {2: 0, 3: 1}


def test_paper_falls_back_to_lifo_when_every_cached_expert_is_needed_later():
    # K=2, initial [2, 3] (3 inserted last). Batch [1, 2, 3]:
    #   1 misses: both 2 and 3 run later in this batch -> LIFO over all -> 3 (slot 1)
    #   2 hits (slot 0)
    #   3 misses: cached {2, 1}, nothing needed later -> LIFO -> 1, the one just inserted (slot 1)
    # Batch [0]: cached {2, 3}, 3 is the most recently inserted -> evict 3 (slot 1).
    _, steps = _run("paper", [[1, 2, 3], [0]], slots=2, initial=[2, 3])
    assert steps == [
        [
            Access(1, hit=False, slot=1, evicted=3),
            Access(2, hit=True, slot=0, evicted=None),
            Access(3, hit=False, slot=1, evicted=1),
        ],
        [Access(0, hit=False, slot=1, evicted=3)],
    ]


def test_paper_counts_experts_that_already_ran_in_the_batch_as_not_needed():
    # K=2, empty start. Batch [0, 1, 2]: 0 and 1 fill slots 0, 1 (no eviction);
    #   2 misses: 0 and 1 already ran -> both not needed, LIFO -> 1 (slot 1).
    _, steps = _run("paper", [[0, 1, 2]], slots=2)
    assert _misses(steps) == [(0, None), (1, None), (2, 1)]
    assert [a.slot for a in steps[0]] == [0, 1, 1]


def test_fifo_evicts_the_earliest_inserted_even_if_just_used():
    # K=2: [0] -> slot 0, [1] -> slot 1, [0] hits, [2] evicts 0 (inserted first) into slot 0, [3] evicts 1 (slot 1).
    _, steps = _run("fifo", [[0], [1], [0], [2], [3]], slots=2)
    assert _misses(steps) == [(0, None), (1, None), (2, 0), (3, 1)]
    assert [s[0].slot for s in steps] == [0, 1, 0, 0, 1]


def test_lru_evicts_the_least_recently_used():
    # Same trace as fifo: [0] hit at step 3 makes 1 the least recently used -> [2] evicts 1 (slot 1);
    # then [3]: 0 was used before 2 -> evict 0 (slot 0).
    _, steps = _run("lru", [[0], [1], [0], [2], [3]], slots=2)
    assert _misses(steps) == [(0, None), (1, None), (2, 1), (3, 0)]


def test_lru_counts_initial_loads_in_order_and_hits_as_uses():
    # K=3, initial [0, 1, 2] (loaded in that order). Batch [0, 3]: 0 hits (now most recent); 3 evicts 1, the least
    # recently used (loaded before 2, never accessed).
    _, steps = _run("lru", [[0, 3]], slots=3, initial=[0, 1, 2])
    assert steps[0][1] == Access(3, hit=False, slot=1, evicted=1)


def test_lfu_keeps_counts_across_evictions_and_breaks_ties_by_recency():
    # K=2. [0] [0]: 0 used twice. [1]: slot 1. [2]: uses 0:2, 1:1 -> evict 1 (slot 1).
    # [1] again: uses 0:2, 2:1 -> evict 2; 1 now has 2 uses (its count survived its eviction).
    # [3]: 0 and 1 both have 2 uses; 0 was used longer ago -> evict 0 (slot 0).
    # With per-stay counts, 1 would have had 1 use and been the victim instead.
    _, steps = _run("lfu", [[0], [0], [1], [2], [1], [3]], slots=2)
    assert _misses(steps) == [(0, None), (1, None), (2, 1), (1, 2), (3, 0)]
    assert steps[-1][0].slot == 0


def test_belady_evicts_the_expert_used_farthest_in_the_future():
    # K=2, initial [0, 1]. Batches [2] [0] [1]:
    #   2 misses: 0 is next used at flat position 1, 1 at position 2 -> evict 1 (slot 1)
    #   0 hits; 1 misses: cached {0, 2}, neither is used again -> tie -> lowest id 0 (slot 0)
    batches = [[2], [0], [1]]
    _, steps = _run("belady", batches, slots=2, initial=[0, 1], future=batches)
    assert _misses(steps) == [(2, 1), (1, 0)]
    # Within a batch: K=2, initial [0, 1], batches [0, 2, 3] [1]: 2 evicts 0 (never again) rather than 1; then 3
    # evicts 2 (never again, and 1 is needed in the next batch) -> 1 hits.
    batches = [[0, 2, 3], [1]]
    cache, steps = _run("belady", batches, slots=2, initial=[0, 1], future=batches)
    assert _misses(steps) == [(2, 0), (3, 2)] and steps[1][0].hit
    assert (cache.hits, cache.misses, cache.batches) == (2, 2, 2)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_slot_misses_on_every_change_of_expert(policy):
    # K=1: the only victim is whoever holds slot 0.
    batches = [[0, 1, 2], [2], [0, 2]]
    _, steps = _run(policy, batches, slots=1, initial=[0], future=batches)
    assert [a.hit for s in steps for a in s] == [True, False, False, True, False, False]
    assert _misses(steps) == [(1, 0), (2, 1), (0, 2), (2, 0)]
    assert {a.slot for s in steps for a in s} == {0}


# ---- Belady is optimal ----------------------------------------------------------------------------------------------


def _minimum_misses(batches, slots, initial) -> int:
    """Fewest misses over every possible sequence of eviction choices (free slots filled first, as the cache does)."""
    flat = tuple(e for batch in batches for e in batch)

    @functools.cache
    def best(position: int, cached: frozenset) -> int:
        if position == len(flat):
            return 0
        expert = flat[position]
        if expert in cached:
            return best(position + 1, cached)
        if len(cached) < slots:
            return 1 + best(position + 1, cached | {expert})
        return 1 + min(best(position + 1, (cached - {victim}) | {expert}) for victim in cached)

    return best(0, frozenset(initial))


def _random_trace(rng: random.Random):
    experts = rng.randint(1, 5)
    slots = rng.randint(1, min(3, experts))
    batches = [sorted(rng.sample(range(experts), rng.randint(0, experts))) for _ in range(rng.randint(1, 8))]
    initial = rng.sample(range(experts), rng.randint(0, slots))
    return batches, slots, initial


def test_belady_matches_exhaustive_search_and_no_policy_beats_it():
    rng = random.Random(0)
    worse = dict.fromkeys(POLICIES, 0)  # traces on which a policy misses more than the optimum
    for _ in range(400):
        batches, slots, initial = _random_trace(rng)
        optimum = _minimum_misses(batches, slots, initial)
        assert simulate(batches, slots, "belady", initial=initial).misses == optimum, (batches, slots, initial)
        for policy in POLICIES:
            misses = simulate(batches, slots, policy, initial=initial).misses
            assert misses >= optimum
            worse[policy] += misses > optimum
    # The traces are hard enough to tell the policies apart (otherwise the equality above would prove little).
    assert worse["belady"] == 0 and all(worse[p] > 20 for p in ("paper", "fifo", "lru", "lfu")), worse


# ---- Access records and bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_access_records_agree_with_the_resident_map(policy):
    rng = random.Random(1)
    for _ in range(100):
        batches, slots, initial = _random_trace(rng)
        cache = ExpertCache(slots, policy, initial=initial, future=batches)
        holder = dict(enumerate(initial))  # slot -> expert, rebuilt from the Access records alone
        assert cache.resident == {e: s for s, e in holder.items()}
        for batch in batches:
            accesses = cache.step(batch)
            assert [a.expert for a in accesses] == batch
            for a in accesses:
                assert 0 <= a.slot < slots
                if a.hit:
                    assert holder[a.slot] == a.expert and a.evicted is None
                else:
                    assert a.expert not in holder.values()
                    assert a.evicted == holder.get(a.slot)
                    # A free slot is used before anything is evicted, the lowest free one first.
                    free = [s for s in range(slots) if s not in holder]
                    assert (a.slot == min(free)) if free else (a.evicted is not None)
                    holder[a.slot] = a.expert
            assert cache.resident == {e: s for s, e in holder.items()}
        stats = simulate(batches, slots, policy, initial=initial)
        assert (cache.hits, cache.misses) == (stats.hits, stats.misses)
        assert stats.hits + stats.misses == stats.accesses == sum(map(len, batches)) == cache.accesses
        assert cache.batches == len(batches)


def test_bad_input_raises_pipeline_errors():
    for slots in (0, -1):
        with pytest.raises(PipelineError, match="slots must be an integer >= 1"):
            ExpertCache(slots, "lru")
    with pytest.raises(PipelineError, match="more than once"):
        ExpertCache(2, "lru").step([1, 1])
    with pytest.raises(PipelineError, match="do not fit in 2 slots"):
        ExpertCache(2, "lru", initial=[0, 1, 2])
    with pytest.raises(PipelineError, match="more than once"):
        ExpertCache(2, "lru", initial=[1, 1])
    with pytest.raises(PipelineError, match="offline oracle"):
        ExpertCache(2, "belady")
    with pytest.raises(PipelineError, match="unknown eviction policy 'mru'.*paper, fifo, lru, lfu, belady"):
        make_policy("mru")
    cache = ExpertCache(2, "belady", future=[[0, 1], [2]])
    cache.step([0, 1])
    with pytest.raises(PipelineError, match=r"batch 1 runs experts \[3\].*diverged"):
        cache.step([3])
    cache.step([2])  # the failed step changed nothing
    with pytest.raises(PipelineError, match="beyond the recorded future"):
        cache.step([0])
