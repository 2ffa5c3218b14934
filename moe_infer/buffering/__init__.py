"""Expert buffering (the paper's second technique): each rank keeps all its local experts in host memory and only K
of them in device slots, loading a missing active expert on demand and evicting another by a policy.

    cache.py     ExpertCache: the slot state machine (hits, misses, victims), Access records, simulate()
    policies.py  the eviction policies by name: paper (not needed later in the batch, then LIFO), fifo, lru, lfu,
                 and belady (Belady's MIN, the offline optimum, for replays only)
    replay.py    replay recorded expert loads through every policy and cache size (`python -m moe_infer.buffering`)
    prefetch.py  the cross-layer prefetch study (beyond the paper): predict layer l+1's experts from layer l's and
                 copy them in early; replayed against a base-rate control (`python -m moe_infer.buffering prefetch`).
                 Not used by the engine: on our traces it did not beat plain LFU eviction (see its docstring)
    store.py     the engine's expert store, which moves the weights as ExpertCache decides
"""

from moe_infer.buffering.cache import Access, CacheStats, ExpertCache, simulate
from moe_infer.buffering.policies import POLICIES, EvictionPolicy, make_policy

__all__ = ["Access", "CacheStats", "EvictionPolicy", "ExpertCache", "POLICIES", "make_policy", "simulate"]
