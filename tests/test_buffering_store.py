"""The engine's expert store with buffering (moe_infer.buffering.store), in a served MoE layer (moe_infer.moe.layer):
the same outputs as every expert resident, for every eviction policy and slot count, and the same hit/miss figures as
the cache replay.

Shape legend: T tokens, D model dim, E experts.
"""

import pytest
import torch
from moe_layers import D, E, layer_config, random_layer

from moe_infer.buffering.cache import simulate
from moe_infer.buffering.store import ENGINE_EVICTIONS, BufferedExperts
from moe_infer.moe import crossover, kernels
from moe_infer.moe.experts import LocalExperts
from moe_infer.moe.layer import MoEOptions, build_moe_layer
from moe_infer.placement import Placement
from pipeline.errors import PipelineError

CALLS = [12, 1, 2, 30, 3, 1, 7]  # tokens per call: decode-sized calls activate few experts, prefill-sized most


def _tensors(cfg):
    router, experts = random_layer(cfg)
    return dict(router.state_dict()), {e: dict(ffn.state_dict()) for e, ffn in enumerate(experts)}


def _layer(policy, cfg, router, experts, placement, options=None, slots=None, eviction="paper"):
    """One served MoE layer, with a buffered store of `slots` device slots when given (as the runtime builds it)."""
    store = None
    if slots is not None:
        store = BufferedExperts(cfg, [experts[e] for e in placement.local_experts(0)], slots, eviction)
    return build_moe_layer(policy, policy, cfg, router, experts, placement, options or MoEOptions(), store=store)


def _calls(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, D, generator=gen) for t in CALLS]


@pytest.mark.parametrize("layout", kernels.LAYOUTS)
@pytest.mark.parametrize("kernel", ["grouped", "per-expert"])
@pytest.mark.parametrize("eviction", ENGINE_EVICTIONS)
@pytest.mark.parametrize("policy", ["dynamic", "static"])
def test_buffered_outputs_equal_resident_at_every_slot_count(policy, eviction, kernel, layout, monkeypatch):
    """Bit for bit: a call whose experts run in rounds, one at a time, computes as the resident kernel does (biases
    after the products when that is grouped, fused when per-expert), in either weight layout."""
    monkeypatch.setenv(crossover.ENV, kernel)
    monkeypatch.setattr(crossover, "default_layout", lambda device: layout)
    cfg = layer_config(topk=2, pre_softmax=False)
    router, experts = _tensors(cfg)
    placement = Placement.contiguous(E, 1)
    options = MoEOptions(capacity_fraction=4.0)
    resident = _layer(policy, cfg, router, experts, placement, options)
    assert isinstance(resident.experts, LocalExperts) and resident.experts.weights.layout == layout
    expected = [resident(x_TD) for x_TD in _calls()]
    for slots in range(1, E):
        layer = _layer(policy, cfg, router, experts, placement, options, slots, eviction)
        assert isinstance(layer.experts, BufferedExperts) and layer.experts.slots.layout == layout
        for x_TD, y_TD in zip(_calls(), expected, strict=True):
            assert torch.equal(layer(x_TD), y_TD), (policy, eviction, slots)
        stats = layer.experts.stats
        assert stats.calls == len(CALLS) and stats.bytes_copied == stats.misses * layer.experts.expert_bytes()
        assert stats.device_bytes == slots * layer.experts.expert_bytes()
        assert stats.host_bytes == E * layer.experts.expert_bytes()


def test_store_hits_and_misses_are_the_replayed_cache_figures():
    """The store decides with the same cache the replay tool simulates: same active sets, same misses."""
    cfg = layer_config(topk=2, pre_softmax=False)
    router, experts = _tensors(cfg)
    placement = Placement.contiguous(E, 1)
    for eviction in ENGINE_EVICTIONS:
        layer = _layer("dynamic", cfg, router, experts, placement, slots=3, eviction=eviction)
        layer.recording, layer.counts = True, []
        for x_TD in _calls(seed=1):
            layer(x_TD)
        active = [torch.nonzero(counts_E).flatten().tolist() for counts_E in layer.counts]
        replayed = simulate(active, slots=3, policy=eviction, initial=[0, 1, 2])
        stats = layer.experts.stats
        assert (stats.hits, stats.misses) == (replayed.hits, replayed.misses), eviction
        assert stats.misses > 0  # the calls are chosen so that buffering has work to do


def _poison(weights, places) -> None:
    """NaN into places `places` of one tier's stacked weights (the host tier's experts or the device slots)."""
    for tensor in weights.tensors:
        tensor[list(places)] = float("nan")


def _token_on_resident_experts(cfg, router, experts, placement, options, resident_experts):
    """One token whose top-k experts all sit in the store's slots at the start, and the resident layer's output."""
    resident = _layer("dynamic", cfg, router, experts, placement, options)
    resident.recording, resident.counts = True, []
    for x_TD in _calls(seed=2):
        for t in range(x_TD.shape[0]):
            y_TD = resident(x_TD[t : t + 1])
            active = set(torch.nonzero(resident.counts[-1]).flatten().tolist())
            if active <= resident_experts:
                return x_TD[t : t + 1], y_TD, sorted(active)
    raise AssertionError("no token of the test calls routes to the initial slots' experts only")


@pytest.mark.parametrize("kernel", ["grouped", "per-expert"])
def test_experts_run_from_their_device_slots_not_the_host_tier(kernel, monkeypatch):
    """Which tier the experts compute from: a store that computed from the host copy would pass every output test
    above. Here the host tier is poisoned after the slots are filled (hits must not notice), and then a slot is
    poisoned (its expert's rows must change), on both kernels' paths (one grouped call over the slots, one expert at
    a time); and each slot holds the expert the cache says it holds, after calls with misses."""
    monkeypatch.setenv(crossover.ENV, kernel)
    cfg = layer_config(topk=2, pre_softmax=False)
    router, experts = _tensors(cfg)
    placement, options, slots = Placement.contiguous(E, 1), MoEOptions(capacity_fraction=4.0), E - 1
    x_TD, expected_TD, active = _token_on_resident_experts(cfg, router, experts, placement, options, set(range(slots)))

    layer = _layer("dynamic", cfg, router, experts, placement, options, slots)
    store = layer.experts
    _poison(store.host, range(E))  # every expert's host copy: a hit that read it would give NaN
    assert torch.equal(layer(x_TD), expected_TD)
    assert store.stats.misses == 0 and store.stats.hits == len(active)

    layer = _layer("dynamic", cfg, router, experts, placement, options, slots)
    store = layer.experts
    _poison(store.slots, [store.cache.resident[active[0]]])  # the slot of one expert this token uses
    assert torch.isnan(layer(x_TD)).all()

    layer = _layer("dynamic", cfg, router, experts, placement, options, slots=2)
    store = layer.experts
    for x_TD in _calls():
        layer(x_TD)
    assert store.stats.misses > 0
    for expert, slot in store.cache.resident.items():
        for slot_weight, name in zip(
            store.slots.tensors, ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), strict=True
        ):
            assert torch.equal(slot_weight[slot], experts[expert][name]), (expert, slot, name)


def test_slots_at_least_the_local_experts_mean_buffering_off():
    """The runtime keeps every expert resident when the slots would hold them all (moe_infer.runtime.engine)."""
    from moe_infer.runtime.engine import expert_store

    cfg = layer_config(topk=2, pre_softmax=False)
    _, experts = _tensors(cfg)
    assert expert_store(cfg, list(experts.values()), slots=E, eviction="paper", device="cpu") is None
    assert isinstance(expert_store(cfg, list(experts.values()), E - 1, "paper", "cpu"), BufferedExperts)


def test_bad_buffering_settings_are_refused():
    cfg = layer_config(topk=2, pre_softmax=False)
    router, experts = _tensors(cfg)
    local = [experts[e] for e in range(E)]
    with pytest.raises(PipelineError, match="between 1 and the 8 local experts"):
        BufferedExperts(cfg, local, slots=0)
    with pytest.raises(PipelineError, match="belady is an offline oracle"):
        BufferedExperts(cfg, local, slots=2, eviction="belady")
    with pytest.raises(PipelineError, match="dynamic and static policies, not 'megatron'"):
        _layer("megatron", cfg, router, experts, Placement.contiguous(E, 1), slots=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy path needs a CUDA device")
def test_cuda_copy_path_matches_resident():
    cfg = layer_config(topk=2, pre_softmax=False)
    router, experts = _tensors(cfg)
    experts = {e: {k: v.cuda() for k, v in t.items()} for e, t in experts.items()}
    router = {k: v.cuda() for k, v in router.items()}
    placement = Placement.contiguous(E, 1)
    resident = _layer("dynamic", cfg, router, experts, placement)
    layer = _layer("dynamic", cfg, router, experts, placement, slots=2)
    assert layer.experts.host.w1_GFD.is_pinned()
    for x_TD in _calls():
        x_TD = x_TD.cuda()
        torch.testing.assert_close(layer(x_TD), resident(x_TD), rtol=0, atol=0)
    stats = layer.experts.stats
    assert stats.misses > 0 and stats.copy_seconds > 0
