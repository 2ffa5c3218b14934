"""The expert kernel (moe_infer.moe.kernels) and its measured crossover (moe_infer.moe.crossover): grouped GEMM and
per-expert runs equal the reference experts within fp32 rounding, with and without biases, whatever the rows per
expert (empty experts, long gaps, calls split by the row budget); the crossover is measured once and cached, and
MOE_EXPERT_KERNEL forces a kernel.

Shape legend: G experts, M rows, D model dim, F ffn dim.
"""

import json

import pytest
import torch
from moe_layers import D, E, F, layer_config, random_layer, reference_moe

from moe_infer.buffering.store import BufferedExperts
from moe_infer.model import ExpertFFN, ModelConfig
from moe_infer.moe import crossover, kernels
from moe_infer.moe.experts import LocalExperts
from moe_infer.moe.kernels import ExpertKernel, ExpertWeights
from moe_infer.moe.layer import build_moe_layer
from moe_infer.placement import Placement
from pipeline.errors import ConfigError, PipelineError

F_module = torch.nn.functional
real = F_module.grouped_mm

# Rows per expert: empty experts at both ends and a gap longer than GAP_SPLIT, one expert with many rows.
ROWS_G = [0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 40, 0, 2, 0, 0]


def _experts(cfg: ModelConfig, count: int, bias: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    f1 = 2 * cfg.ffn_hidden_size if cfg.activation == "swiglu" else cfg.ffn_hidden_size
    experts = []
    for _ in range(count):
        tensors = {"fc1.weight": torch.randn(f1, D, generator=gen), "fc2.weight": torch.randn(D, F, generator=gen)}
        if bias:
            tensors |= {"fc1.bias": torch.randn(f1, generator=gen), "fc2.bias": torch.randn(D, generator=gen)}
        experts.append(tensors)
    return experts


def _reference(cfg, experts, x_MD, p_M, rows_G) -> torch.Tensor:
    """moe_infer.model.moe's ExpertFFN, one expert at a time (absent biases are zeros)."""
    out, start = [], 0
    for tensors, n in zip(experts, rows_G, strict=True):
        ffn = ExpertFFN(cfg).to_empty(device="cpu")
        full = {"fc1.bias": torch.zeros(ffn.fc1.bias.shape), "fc2.bias": torch.zeros(D), **tensors}
        ffn.load_state_dict(full)
        out.append(ffn(x_MD[start : start + n], p_M[start : start + n]))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_and_per_expert_equal_the_reference(activation, bias, monkeypatch):
    cfg = layer_config(topk=2, pre_softmax=False, activation=activation)
    experts = _experts(cfg, len(ROWS_G), bias)
    weights = ExpertWeights.stack(experts)
    assert (weights.b1_GF is None) == (not bias)
    gen = torch.Generator().manual_seed(1)
    x_MD, p_M = torch.randn(sum(ROWS_G), D, generator=gen), torch.rand(sum(ROWS_G), generator=gen)
    expected = _reference(cfg, experts, x_MD, p_M, ROWS_G)
    kernel = ExpertKernel(activation, F, grouped_max_rows=crossover.ALWAYS)
    for budget in (1 << 20, 6 * 2 * F * 4):  # one call per run of experts; calls of about 6 rows
        monkeypatch.setattr(kernels, "CPU_ROWS_BUDGET_BYTES", budget)
        got = kernel.grouped(weights, x_MD, p_M, ROWS_G, torch.full_like(x_MD, float("nan")))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got = kernel.per_expert(weights, x_MD, p_M, ROWS_G, torch.full_like(x_MD, float("nan")))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_calls_skip_long_gaps_and_respect_the_row_budget():
    # (first expert, last + 1, first row, end row) per call.
    assert kernels._runs(ROWS_G, budget=1000) == [(1, 3, 0, 4), (12, 16, 4, 51)]
    assert kernels._runs(ROWS_G, budget=8) == [(1, 3, 0, 4), (12, 13, 4, 9), (13, 14, 9, 49), (15, 16, 49, 51)]
    assert kernels._runs([0, 0], budget=8) == []
    assert kernels._runs([1, 0, 0, 1], budget=8) == [(0, 4, 0, 2)]  # a short gap stays inside the call


def test_one_kernel_runs_the_whole_call_chosen_by_its_rows_per_active_expert(monkeypatch):
    kernel = ExpertKernel("gelu", F, grouped_max_rows=4)
    assert kernel.uses_grouped([4, 0, 4, 0]) and kernel.uses_grouped([2, 5, 3, 0])  # 4 and 3.3 rows on average
    assert not kernel.uses_grouped([2, 40, 3, 0])  # 15 on average: a big expert makes the call per-expert
    assert not kernel.uses_grouped([5, 0, 5, 0])
    assert not kernel.uses_grouped([0, 3, 0, 0])  # one active expert: nothing to group
    calls = []
    monkeypatch.setattr(F_module, "grouped_mm", lambda a, b, offs: calls.append(b.shape[0]) or real(a, b, offs=offs))
    cfg = layer_config(topk=2, pre_softmax=False)
    experts = _experts(cfg, len(ROWS_G), bias=True)
    weights = ExpertWeights.stack(experts)
    gen = torch.Generator().manual_seed(2)
    x_MD, p_M = torch.randn(sum(ROWS_G), D, generator=gen), torch.rand(sum(ROWS_G), generator=gen)
    expected = _reference(cfg, experts, x_MD, p_M, ROWS_G)
    # ROWS_G: 51 rows over 5 active experts, 10.2 on average (one of them 40).
    for crossover_rows, expected_calls in ((11, [2, 2, 4, 4]), (10, [])):
        calls.clear()
        kernel = ExpertKernel("gelu", F, grouped_max_rows=crossover_rows)
        got = kernel(weights, x_MD, p_M, ROWS_G, torch.full_like(x_MD, float("nan")))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Grouped: fc1 and fc2 of experts 1-2, then of experts 12-15 with the big one among them; else none.
        assert calls == expected_calls


def test_each_layout_stores_the_matrices_as_it_says_and_buffered_slots_alike():
    cfg = layer_config(topk=2, pre_softmax=False)
    assert kernels.default_layout("cpu") == kernels.TRANSPOSED and kernels.default_layout("cuda") == kernels.EXPORTED
    for layout in kernels.LAYOUTS:
        weights = ExpertWeights.stack(_experts(cfg, 3, bias=True), layout=layout)
        slots = weights.empty_like(2, "cpu")
        for stacked in (weights, slots):
            # Always seen as [G, out, in]; stored so (exported) or [G, in, out] (transposed: x @ W^T reads W^T row
            # by row).
            assert stacked.layout == layout
            assert stacked.w1_GFD.shape[1:] == (F, D) and stacked.w2_GDF.shape[1:] == (D, F)
            for w in (stacked.w1_GFD, stacked.w2_GDF):
                assert (w if layout == kernels.EXPORTED else w.transpose(1, 2)).is_contiguous(), layout
        slots.copy_expert_(1, weights, 2)
        assert torch.equal(slots.w1_GFD[1], weights.w1_GFD[2])
    with pytest.raises(PipelineError, match="layout 'diagonal'"):
        ExpertWeights.stack(_experts(cfg, 1, bias=True), layout="diagonal")


def test_the_layout_is_the_one_whose_faster_kernel_took_less_time_and_the_crossover_is_read_in_it(monkeypatch):
    """With times made up per (layout, kernel, rows): exported is faster overall though transposed wins at 1 row; in
    exported, grouped wins up to 4 rows, loses at 8, wins at 16, then loses twice (the crossover: 16)."""
    seconds = {  # rows -> (layout, kernel) -> time
        rows: {
            (kernels.EXPORTED, "grouped"): grouped,
            (kernels.EXPORTED, "per-expert"): 1.0,
            (kernels.TRANSPOSED, "grouped"): 1.5 * transposed,  # per-expert always wins here
            (kernels.TRANSPOSED, "per-expert"): transposed,
        }
        for rows, grouped, transposed in (
            (1, 0.5, 0.4),
            (2, 0.5, 2),
            (4, 0.9, 2),
            (8, 1.1, 2),
            (16, 0.9, 2),
            (32, 1.2, 2),
            (64, 1.3, 2),
            (128, 0.5, 2),
        )
    }
    measured = []

    def made_up(calls, device):
        rows = 1 << len(measured)
        measured.append(rows)
        assert set(calls) == set(seconds[rows])
        return seconds[rows]

    monkeypatch.setattr(crossover, "_fastest", made_up)
    assert crossover._measure(torch.device("cpu"), torch.float32, D, F, "gelu", True) == (16, kernels.EXPORTED, "")
    assert measured == [1, 2, 4, 8, 16, 32, 64]  # stopped once per-expert won twice in a row in both layouts


def test_experts_are_stacked_in_the_layout_their_kernel_was_measured_with(monkeypatch):
    cfg = layer_config(topk=2, pre_softmax=False)
    for layout in kernels.LAYOUTS:
        monkeypatch.setattr(crossover, "measured_kernel", lambda *args, layout=layout: (4, layout, "made up"))
        monkeypatch.delenv(crossover.ENV, raising=False)
        for experts in (LocalExperts(cfg, _experts(cfg, 3, True)), BufferedExperts(cfg, _experts(cfg, 3, True), 2)):
            kernel = experts.kernel
            assert (kernel.grouped_max_rows, kernel.layout) == (4, layout)
            for stacked in (experts.weights,) if isinstance(experts, LocalExperts) else (experts.host, experts.slots):
                assert stacked.layout == layout


def test_mixed_biases_are_refused():
    cfg = layer_config(topk=2, pre_softmax=False)
    with_bias, without = _experts(cfg, 1, True), _experts(cfg, 1, False)
    with pytest.raises(PipelineError, match="some experts of a layer have biases"):
        ExpertWeights.stack(with_bias + without)


def test_the_crossover_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path))
    monkeypatch.delenv(crossover.ENV, raising=False)
    monkeypatch.setattr(crossover, "_measured", {})
    monkeypatch.setattr(crossover, "MAX_ROWS", 8)
    kernel = crossover.choose_kernel("gelu", D, F, True, "cpu", torch.float32)
    assert kernel.note.startswith("measured crossover")
    cached = json.loads((tmp_path / crossover.CACHE_FILE).read_text())
    (key,) = cached
    assert cached[key] == {"grouped_max_rows": kernel.grouped_max_rows, "layout": kernel.layout}
    assert f"|D{D}|F{F}|gelu|bias=True|" in key and kernel.layout in kernels.LAYOUTS
    monkeypatch.setattr(crossover, "_measured", {})
    monkeypatch.setattr(crossover, "_measure", lambda *a: pytest.fail("measured again despite the cache"))
    again = crossover.choose_kernel("gelu", D, F, True, "cpu", torch.float32)
    assert (again.grouped_max_rows, again.layout) == (kernel.grouped_max_rows, kernel.layout)
    assert "cached" in again.note


def test_a_grouped_mm_that_disagrees_falls_back_to_per_expert(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path))
    monkeypatch.setattr(crossover, "_measured", {})
    monkeypatch.setattr(kernels.F, "grouped_mm", lambda a, b, offs: torch.zeros(a.shape[0], b.shape[-1]))
    rows, layout, note = crossover.measured_kernel(torch.device("cpu"), torch.float32, D, F, "gelu", True)
    assert rows == 0 and layout in kernels.LAYOUTS and "disagrees" in note
    assert not (tmp_path / crossover.CACHE_FILE).exists()  # a fallback is not a measurement: never cached


def test_the_environment_forces_a_kernel(monkeypatch):
    monkeypatch.setenv(crossover.ENV, "per-expert")
    assert crossover.choose_kernel("gelu", D, F, True, "cpu", torch.float32).grouped_max_rows == 0
    monkeypatch.setenv(crossover.ENV, "grouped")
    assert crossover.choose_kernel("gelu", D, F, True, "cpu", torch.float32).grouped_max_rows == crossover.ALWAYS
    monkeypatch.setenv(crossover.ENV, "fastest")
    with pytest.raises(ConfigError, match="MOE_EXPERT_KERNEL"):
        crossover.choose_kernel("gelu", D, F, True, "cpu", torch.float32)


@pytest.mark.parametrize("kernel", ["grouped", "per-expert"])
def test_a_layer_without_expert_biases_equals_the_reference_resident_and_buffered(kernel, monkeypatch):
    monkeypatch.setenv(crossover.ENV, kernel)
    cfg = layer_config(topk=2, pre_softmax=False)
    router, full = random_layer(cfg)
    experts = {e: {k: v for k, v in ffn.state_dict().items() if k.endswith("weight")} for e, ffn in enumerate(full)}
    for ffn in full:  # the reference: the same experts with zero biases
        ffn.fc1.bias.zero_()
        ffn.fc2.bias.zero_()
    placement = Placement.contiguous(E, 1)
    gen = torch.Generator().manual_seed(3)
    stores = [None, BufferedExperts(cfg, [experts[e] for e in range(E)], slots=E // 2)]
    for store in stores:
        layer = build_moe_layer("dynamic", "moe", cfg, dict(router.state_dict()), experts, placement, store=store)
        assert isinstance(layer.experts, LocalExperts if store is None else BufferedExperts)
        for tokens in (1, 3, 40):
            x_TD = torch.randn(tokens, D, generator=gen)
            expected = reference_moe(x_TD, *router(x_TD), full)
            torch.testing.assert_close(layer(x_TD), expected, rtol=1e-5, atol=1e-5)
