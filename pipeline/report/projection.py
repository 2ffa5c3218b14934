"""The report's GPU projection: the paper's deployments costed by moe_infer.cost_model (a MODEL: roofline at named GPU
figures, link bandwidths) at the paper's shapes (configs/paper-lm.yaml, paper-mt.yaml), fed with the project's own
expert traces, next to the paper's figures. Nothing here is measured; the section says so and lists the assumptions.

    section = projection_section(found["replay"])

    decode        the MT decoder's step latency per GPU against expert slots K per GPU (expert buffering): active
                  experts and misses per call at each K from a replay of the project's MT trace at the paper's 16
                  experts per GPU (python -m moe_infer.bench replay --ranks 8 on the 128-expert MT), the copies over
                  the GPU's host link
    memory        the weights a GPU holds with the decoder's MoE layers buffered at K slots, against every expert
                  resident: the paper's 1.47x (static memory)
    throughput    the LM's forward pass with dynamic vs static gating at a few token counts per GPU: the paper's
                  6.21x
    re-balance    bytes and time to move N of the paper LM's experts between GPUs (NVLink) or from the host (PCIe)
"""

from __future__ import annotations

from typing import Any

from moe_infer import cost_model as cm
from pipeline.report.sections import Section, Table, Text, fmt
from pipeline.report.sources import Source

PAPER_MEMORY_SAVING = 1.47
PAPER_LM_THROUGHPUT = 6.21
DECODE_GPUS = ("V100-SXM2-32GB", "H100-SXM5-80GB")
PAPER_EXPERTS_PER_GPU = 16  # paper-mt: 128 experts on 8 GPUs
DECODE_BATCH, DECODE_CONTEXT = 8, 128  # sequences per GPU, tokens of context (the paper's batch 8)
LM_TOKENS = (512, 2048, 8192)  # tokens per GPU in one forward pass
REBALANCE_EXPERTS = (1, 8, 64)
REPLAY_COMMAND = (
    "python -m moe_infer.bench replay --trace runs/bench/traces/mt.npz --ranks 8 --run-dir runs/bench/replay-mt-ep8"
)


def shapes() -> dict[str, cm.MoEShape]:
    """The paper's models as the cost model sees them (from their configs): the LM whole, the MT whole (memory) and
    the MT decoder (decoding)."""
    from pipeline.config import load_config

    lm, mt = load_config("paper-lm"), load_config("paper-mt")

    def shape(cfg, stacks: dict[str, int], cross: int) -> cm.MoEShape:
        interval = cfg.moe.interval
        moe = sum(layers // interval for layers in stacks.values())
        total = sum(stacks.values())
        return cm.MoEShape(
            hidden=cfg.model.hidden_size,
            ffn=cfg.model.ffn_hidden_size,
            experts=cfg.moe.num_experts,
            topk=cfg.moe.topk,
            capacity_fraction=cfg.moe.capacity_fraction,
            moe_layers=moe,
            dense_layers=total - moe,
            attention_layers=total + cross,
            vocab=cfg.tokenizer.vocab_size,
            gpus=cfg.parallel.ep_size,
            swiglu=cfg.model.activation == "swiglu",
        )

    both = {"encoder": mt.model.encoder_layers, "decoder": mt.model.num_layers}
    return {
        "lm": shape(lm, {"decoder": lm.model.num_layers}, 0),
        "mt": shape(mt, both, mt.model.num_layers),
        "mt-decoder": shape(mt, {"decoder": mt.model.num_layers}, mt.model.num_layers),
    }


def trace_per_call(replays: list[Source], experts_per_gpu: int) -> tuple[dict[int, tuple[float, float]], str] | None:
    """{K: (active experts, misses) per decoder MoE layer call per GPU} from a replay of an MT trace at
    `experts_per_gpu` local experts (the paper's LIFO policy), and where it came from; None without one."""
    for source in replays:
        d = source.data
        batches = d.get("batches") or {}
        layers = [name for name in batches if name.startswith("decoder.")]
        if d.get("local_experts") != experts_per_gpu or not layers:
            continue
        calls = sum(batches[name] for name in layers) * d.get("ranks", 1)
        per_k: dict[int, tuple[float, float]] = {}
        for row in d["rows"]:
            if row["layer"] in layers and row["policy"] == "paper":
                active, misses = per_k.get(row["slots"], (0.0, 0.0))
                per_k[row["slots"]] = (active + row["accesses"] / calls, misses + row["misses"] / calls)
        return per_k, f"{d.get('trace', '?')} replayed at {experts_per_gpu} experts per GPU ({source.path})"
    return None


def _decode_table(mt_decoder: cm.MoEShape, mt: cm.MoEShape, trace: dict[int, tuple[float, float]]) -> Table:
    buffered = mt_decoder.moe_layers
    resident_memory = cm.static_memory_bytes(mt, buffered, None)
    columns = ["slots K per GPU", "active / call", "misses / call"]
    columns += [f"{g} step ms (stall ms)" for g in DECODE_GPUS] + ["weights GB per GPU", "static memory saving"]
    rows: list[list[Any]] = []
    ks = sorted(trace)
    full = max(ks)
    for k in [*ks, None]:
        active, misses = trace[k if k is not None else full]
        misses = 0.0 if k is None else misses
        cells: list[Any] = ["all resident" if k is None else k, active, misses]
        for name in DECODE_GPUS:
            gpu = cm.GPUS[name]
            parts = cm.decode_step_seconds(
                mt_decoder, gpu, cm.LINKS[gpu.host_link], DECODE_BATCH, DECODE_CONTEXT, active, misses
            )
            cells.append(f"{sum(parts.values()) * 1e3:.2f} ({parts['stall'] * 1e3:.2f})")
        memory = cm.static_memory_bytes(mt, buffered, k)
        cells += [memory / 1e9, f"{resident_memory / memory:.2f}x"]
        rows.append(cells)
    caption = (
        f"PROJECTED (cost model, not measured): the paper MT's decoder ({mt_decoder.moe_layers} MoE layers of "
        f"{mt_decoder.experts} experts on {mt_decoder.gpus} GPUs, D={mt_decoder.hidden}, F={mt_decoder.ffn}), "
        f"{DECODE_BATCH} sequences per GPU, {DECODE_CONTEXT} tokens of context, one decoding step; misses copied over "
        f"each GPU's host link ({', '.join(f'{g}: {cm.GPUS[g].host_link}' for g in DECODE_GPUS)}). Weights: the whole "
        f"MT model per GPU with only the decoder's MoE layers buffered. Paper: up to {PAPER_MEMORY_SAVING}x less "
        "static memory, throughput comparable at ~10 slots per GPU."
    )
    return Table(columns, rows, caption)


def _throughput_table(lm: cm.MoEShape) -> Table:
    columns = ["GPU", "tokens per GPU", "static ms", "dynamic ms", "dynamic/static throughput", "static: mask products"]
    rows = []
    for name in DECODE_GPUS:
        gpu = cm.GPUS[name]
        for tokens in LM_TOKENS:
            static = cm.forward_seconds(lm, gpu, tokens, tokens, "static")
            dynamic = cm.forward_seconds(lm, gpu, tokens, tokens, "dynamic")
            total_s, total_d = sum(static.values()), sum(dynamic.values())
            mask = (static["dispatch"] + static["combine"]) / total_s
            rows.append([name, tokens, total_s * 1e3, total_d * 1e3, f"{total_s / total_d:.2f}x", f"{mask:.0%}"])
    caption = (
        f"PROJECTED (cost model, not measured): one forward pass of the paper LM ({lm.moe_layers} MoE layers of "
        f"{lm.experts} experts, C={lm.capacity_fraction}, top-{lm.topk}, waste factor "
        f"{lm.experts * lm.capacity_fraction / lm.topk:g}, on {lm.gpus} GPUs) per GPU. Paper: {PAPER_LM_THROUGHPUT}x "
        "(LM, one node, measured on V100s)."
    )
    return Table(columns, rows, caption)


def _rebalance_table(lm: cm.MoEShape) -> Table:
    links = [cm.GPUS["H100-SXM5-80GB"].nvlink, cm.GPUS["H100-SXM5-80GB"].host_link, "PCIe 3.0 x16 (paper)"]
    rows = []
    for n in REBALANCE_EXPERTS:
        moved = [cm.move_experts(n, lm.expert_bytes(), cm.LINKS[link]) for link in links]
        rows.append([n, moved[0].num_bytes / 1e6, *(m.seconds * 1e3 for m in moved)])
    caption = (
        f"PROJECTED: moving N of the paper LM's experts ({lm.expert_bytes() / 1e6:.1f} MB each in fp16), one copy "
        "per expert (cost_model.move_experts): what a re-balance or N cache misses cost."
    )
    return Table(["experts N", "MB", *(f"{link} ms" for link in links)], rows, caption)


def projection_section(replays: list[Source]) -> Section:
    section = Section(
        "projection",
        "8. GPU projection (a cost model, not a measurement)",
        "The paper's deployments costed by a roofline model at named GPU and link figures (moe_infer.cost_model), "
        "at the paper's shapes, with the project's own expert traces. Every figure in this section is projected.",
    )
    found = shapes()
    trace = trace_per_call(replays, PAPER_EXPERTS_PER_GPU)
    if trace is None:
        section.blocks.append(
            Text(
                f"Decoding with expert buffering: not projected, no replay of an MT trace at {PAPER_EXPERTS_PER_GPU} "
                f"experts per GPU was found (run: {REPLAY_COMMAND})."
            )
        )
    else:
        per_k, where = trace
        section.blocks.append(_decode_table(found["mt-decoder"], found["mt"], per_k))
        section.blocks.append(Text(f"Active experts and misses per call: {where}, the paper's eviction policy."))
    section.blocks.append(_throughput_table(found["lm"]))
    section.blocks.append(_rebalance_table(found["lm"]))
    constants = [
        f"{g.name}: {fmt(g.peak_flops / 1e12)} TFLOP/s, {fmt(g.bandwidth / 1e9)} GB/s ({g.source})"
        for g in cm.GPUS.values()
    ]
    constants += [
        f"{link.name}: {fmt(link.bandwidth / 1e9)} GB/s one way ({link.source})" for link in cm.LINKS.values()
    ]
    section.blocks.append(Text("Hardware figures: " + "; ".join(constants) + "."))
    section.blocks.append(Text("Assumptions: " + " ".join(f"({i}) {a}" for i, a in enumerate(cm.ASSUMPTIONS, 1))))
    return section
