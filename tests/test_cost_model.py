"""The GPU cost model (moe_infer.cost_model): the roofline, transfers over named links, and the projections'
directions at the paper's shapes (its absolute figures are a model: the report labels them so)."""

import pytest

from moe_infer import cost_model as cm

V100 = cm.GPUS["V100-SXM2-32GB"]
PAPER_LM = cm.MoEShape(
    1024, 4096, 512, 2, 0.05, moe_layers=12, dense_layers=12, attention_layers=24, vocab=51200, gpus=8
)


def test_every_hardware_figure_names_its_source():
    assert all(g.source and g.nvlink in cm.LINKS and g.host_link in cm.LINKS for g in cm.GPUS.values())
    assert all(link.source and link.bandwidth > 0 for link in cm.LINKS.values())


def test_the_roofline_is_the_slower_of_compute_and_memory():
    flops = V100.peak_flops * cm.ACHIEVED_FLOPS  # one second of compute
    assert cm.roofline_seconds(flops, 0, V100) == pytest.approx(1.0)
    assert cm.roofline_seconds(flops, 10 * V100.bandwidth * cm.ACHIEVED_BANDWIDTH, V100) == pytest.approx(10.0)
    # A decode-sized product is memory-bound (the weights dominate), a prefill-sized one compute-bound.
    assert cm.gemm_seconds(8, 1024, 4096, V100) == pytest.approx(
        (8 * 1024 + 1024 * 4096 + 8 * 4096) * 2 / (V100.bandwidth * cm.ACHIEVED_BANDWIDTH)
    )
    assert cm.gemm_seconds(8192, 1024, 4096, V100) == pytest.approx(2 * 8192 * 1024 * 4096 / (V100.peak_flops * 0.6))


def test_moving_experts_costs_a_latency_each_and_their_bytes_over_the_link():
    link = cm.LINKS["PCIe 3.0 x16 (paper)"]
    moved = cm.move_experts(4, PAPER_LM.expert_bytes(), link)
    assert moved.num_bytes == 4 * 2 * 1024 * 4096 * 2
    assert moved.seconds == pytest.approx(4 * link.latency + moved.num_bytes / 12e9)
    assert cm.move_experts(0, PAPER_LM.expert_bytes(), link).seconds == 0.0


def test_static_gating_costs_more_the_more_tokens_and_buffering_saves_weights():
    ratios = []
    for tokens in (512, 2048, 8192):
        static = sum(cm.forward_seconds(PAPER_LM, V100, tokens, tokens, "static").values())
        dynamic = sum(cm.forward_seconds(PAPER_LM, V100, tokens, tokens, "dynamic").values())
        ratios.append(static / dynamic)
    assert 1 < ratios[0] < ratios[1] < ratios[2]  # the one-hot mask products grow with S^2
    resident = cm.static_memory_bytes(PAPER_LM, buffered_layers=12, slots=None)
    assert cm.static_memory_bytes(PAPER_LM, 12, slots=PAPER_LM.local_experts) == resident
    assert cm.static_memory_bytes(PAPER_LM, 12, slots=1) < resident
    with pytest.raises(ValueError, match="expected dynamic or static"):
        cm.moe_layer_seconds(PAPER_LM, 16, V100, "megatron")
