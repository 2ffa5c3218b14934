"""Expert buffering (the paper's second technique): each rank keeps all its local experts in host memory and only K
of them in device slots, loading a missing active expert on demand and evicting another by a policy.

    cache.py     ExpertCache: the slot state machine (hits, misses, victims), Access records, simulate()
    policies.py  the eviction policies by name: paper (not needed later in the batch, then LIFO), fifo, lru, lfu,
                 and belady (Belady's MIN, the offline optimum, for replays only)
    store.py     the engine's expert store, which moves the weights as ExpertCache decides (the runtime gives it to
                 a served MoE layer in place of moe_infer.moe.experts.LocalExperts)

The studies built on the cache are benchmarks: `python -m moe_infer.bench replay` (every eviction policy and cache
size on a recorded trace) and `prefetch` (cross-layer prefetch, not used by the engine); `python -m
moe_infer.buffering replay|prefetch` runs them too.
"""

from moe_infer.buffering.cache import Access, CacheStats, ExpertCache, simulate
from moe_infer.buffering.policies import POLICIES, EvictionPolicy, make_policy

__all__ = ["Access", "CacheStats", "EvictionPolicy", "ExpertCache", "POLICIES", "make_policy", "simulate"]
