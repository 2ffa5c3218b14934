"""A cost model of MoE inference on GPUs: what the paper's deployments would cost, from named hardware figures, the
model's shapes and the project's own measured expert traces. A MODEL, not a measurement: every figure it gives is a
projection under the assumptions below (ASSUMPTIONS), and the report labels it so.

    shape = MoEShape(hidden=1024, ffn=4096, experts=512, topk=2, capacity_fraction=0.05, ...)   (from a config)
    gemm_seconds(rows, 1024, 4096, GPUS["V100-SXM2-32GB"])        one matrix product, roofline
    move_experts(4, shape.expert_bytes(), LINKS["PCIe 3.0 x16 (paper)"])   bytes and seconds to move 4 experts
    forward_seconds(shape, gpu, link, tokens_per_gpu, "dynamic" | "static")    one forward pass, by part
    decode_step_seconds(shape, gpu, host_link, batch, active, misses)          one decoding step with K slots
    static_memory_bytes(shape, slots=K, buffered="decoder")        the weights a GPU holds with expert buffering

Roofline: an operation takes max(FLOPs / achieved peak, bytes / achieved bandwidth); a transfer takes its link's
latency plus bytes / bandwidth. Collectives: an all-to-all on G GPUs moves (G-1)/G of each GPU's buffer over its
NVLink, each way, after one latency. The shapes are those of the paper's models (configs/paper-lm.yaml,
paper-mt.yaml); the expert traces (active experts and cache misses per call at K slots) are the project's, replayed
at the paper's experts per GPU (moe_infer.bench.replay). Re-balancing experts online (moving N experts between GPUs)
costs move_experts over the NVLink entry.

Shape legend: S tokens per GPU, D model dim, F ffn dim, E experts, K experts per token, G GPUs, C capacity fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- hardware: each figure with where it comes from ---------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    bandwidth: float  # device memory, bytes/s
    nvlink: str  # the LINKS entry between GPUs of one node
    host_link: str  # the LINKS entry to host memory
    source: str


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds per transfer or collective (an assumption: see ASSUMPTIONS)
    source: str


TRANSFER_LATENCY = 10e-6  # one host-to-device copy or one NCCL collective between GPUs of a node
GPUS = {
    g.name: g
    for g in (
        GPU(
            "V100-SXM2-32GB", 125e12, 900e9, "NVLink 2 (V100)", "PCIe 3.0 x16 (paper)",
            "NVIDIA Tesla V100 datasheet: 125 TFLOPS tensor (fp16), 900 GB/s HBM2; the paper's GPU",
        ),
        GPU(
            "A100-SXM4-80GB", 312e12, 2039e9, "NVLink 3 (A100)", "PCIe 4.0 x16",
            "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e",
        ),
        GPU(
            "H100-SXM5-80GB", 989e12, 3.35e12, "NVLink 4 (H100)", "PCIe 5.0 x16",
            "NVIDIA H100 datasheet: 989 TFLOPS bf16 dense (1,979 with sparsity), 3.35 TB/s HBM3",
        ),
    )
}  # fmt: skip
LINKS = {
    link.name: link
    for link in (
        Link("PCIe 3.0 x16 (paper)", 12e9, TRANSFER_LATENCY, "the paper's measured host-to-device copy, ~12 GB/s"),
        Link("PCIe 4.0 x16", 31.5e9, TRANSFER_LATENCY, "PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b: 31.5 GB/s"),
        Link("PCIe 5.0 x16", 63e9, TRANSFER_LATENCY, "PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes, 128b/130b: 63 GB/s"),
        Link("NVLink 2 (V100)", 150e9, TRANSFER_LATENCY, "NVIDIA Tesla V100 datasheet: 300 GB/s both ways"),
        Link("NVLink 3 (A100)", 300e9, TRANSFER_LATENCY, "NVIDIA A100 datasheet: 600 GB/s both ways"),
        Link("NVLink 4 (H100)", 450e9, TRANSFER_LATENCY, "NVIDIA H100 datasheet: 900 GB/s both ways"),
    )
}
ACHIEVED_FLOPS = 0.6  # of peak, for the large GEMMs of these shapes
ACHIEVED_BANDWIDTH = 0.8  # of peak, for streaming weights and activations
ASSUMPTIONS = [
    f"Roofline: an operation takes max(FLOPs / ({ACHIEVED_FLOPS:.0%} of peak), bytes / ({ACHIEVED_BANDWIDTH:.0%} of "
    "peak bandwidth)); the fractions are assumptions, typical of large fp16 GEMMs and of streaming reads.",
    "fp16/bf16 weights and activations (2 bytes); no kernel-launch or framework overhead beyond one latency per "
    f"transfer and per collective ({TRANSFER_LATENCY * 1e6:.0f} us, an assumption).",
    "All-to-all on G GPUs: (G-1)/G of each GPU's buffer crosses its NVLink each way; experts balanced over GPUs.",
    "Static gating: every expert computes its C*S slots, and the dispatch and combine are the one-hot mask products "
    "of GShard/fairseq (S x E x C*S x D multiply-adds each); dynamic: exactly K*S rows, a sort and index gathers.",
    "Expert buffering: a miss copies one expert over the host link; the copies overlap the dispatch all-to-all "
    "(as in the paper) and what is left over stalls the step.",
    "Active experts and misses per call come from the project's traces of its own trained models, replayed at the "
    "paper's experts per GPU: a small model's routing stands in for the paper model's.",
    "Attention: each decoding step reads its KV cache (context length given) once per layer; the dense weights are "
    "read once per step or per forward pass.",
]


# ---- the model's shape ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEShape:
    hidden: int  # D
    ffn: int  # F
    experts: int  # E
    topk: int  # K
    capacity_fraction: float  # C
    moe_layers: int  # MoE FFN layers in the stack(s) considered
    dense_layers: int  # dense FFN layers in the same stack(s)
    attention_layers: int  # self-attention layers (cross-attention counts as one more)
    vocab: int
    gpus: int  # G: expert-parallel degree
    swiglu: bool = False
    dtype_bytes: int = 2

    @property
    def local_experts(self) -> int:
        return self.experts // self.gpus

    def expert_params(self) -> int:
        return (3 if self.swiglu else 2) * self.hidden * self.ffn

    def expert_bytes(self) -> int:
        return self.expert_params() * self.dtype_bytes

    def dense_params(self) -> int:
        """Replicated on every GPU: embeddings, attention, the dense FFNs (norms and biases left out)."""
        attention = 4 * self.hidden**2 * self.attention_layers
        return self.vocab * self.hidden + attention + self.dense_layers * self.expert_params()


# ---- costs ----------------------------------------------------------------------------------------------------------


def roofline_seconds(flops: float, num_bytes: float, gpu: GPU) -> float:
    return max(flops / (gpu.peak_flops * ACHIEVED_FLOPS), num_bytes / (gpu.bandwidth * ACHIEVED_BANDWIDTH))


def gemm_seconds(rows: float, d_in: int, d_out: int, gpu: GPU, dtype_bytes: int = 2) -> float:
    """[rows, d_in] x [d_in, d_out]: reads both operands, writes the product."""
    num_bytes = (rows * d_in + d_in * d_out + rows * d_out) * dtype_bytes
    return roofline_seconds(2 * rows * d_in * d_out, num_bytes, gpu)


def transfer_seconds(num_bytes: float, link: Link) -> float:
    return link.latency + num_bytes / link.bandwidth


@dataclass(frozen=True)
class Transfer:
    num_bytes: float
    seconds: float


def move_experts(num_experts: float, expert_bytes: int, link: Link) -> Transfer:
    """Moving `num_experts` experts of `expert_bytes` each over `link`, one copy per expert (re-balancing, or the
    misses of expert buffering; an average per call may be fractional)."""
    total = num_experts * expert_bytes
    return Transfer(total, num_experts * link.latency + total / link.bandwidth if num_experts else 0.0)


def all_to_all_seconds(bytes_per_gpu: float, gpus: int, link: Link) -> float:
    return link.latency + bytes_per_gpu * (gpus - 1) / gpus / link.bandwidth if gpus > 1 else 0.0


def expert_ffn_seconds(shape: MoEShape, rows: float, active: float, gpu: GPU) -> float:
    """`active` experts on `rows` rows in all: each reads its weights once, the FLOPs follow the rows."""
    flops = 2 * rows * shape.expert_params()
    num_bytes = active * shape.expert_bytes() + 2 * rows * (shape.hidden + shape.ffn) * shape.dtype_bytes
    return roofline_seconds(flops, num_bytes, gpu)


def moe_layer_seconds(shape: MoEShape, tokens: float, gpu: GPU, policy: str) -> dict[str, float]:
    """One MoE layer on one GPU with `tokens` tokens (S): gate, dispatch, experts, combine (all-to-alls included)."""
    d, b = shape.hidden, shape.dtype_bytes
    nvlink = LINKS[gpu.nvlink]
    gate = gemm_seconds(tokens, d, shape.experts, gpu, b)
    if policy == "static":
        slots = shape.capacity_fraction * tokens  # per expert
        buffer_rows = shape.experts * slots  # the padded [E, C*S, D] buffer, all of it crossing the all-to-all
        mask_product = roofline_seconds(
            2 * tokens * buffer_rows * d, (tokens * buffer_rows + (tokens + buffer_rows) * d) * b, gpu
        )
        exchange = all_to_all_seconds(buffer_rows * d * b, shape.gpus, nvlink)
        experts = expert_ffn_seconds(shape, shape.local_experts * slots * shape.gpus, shape.local_experts, gpu)
        return {
            "gate": gate,
            "dispatch": mask_product + exchange,
            "experts": experts,
            "combine": mask_product + exchange,
        }
    if policy != "dynamic":
        raise ValueError(f"policy {policy!r}: expected dynamic or static")
    rows = shape.topk * tokens  # balanced: every GPU computes K*S rows
    sort = roofline_seconds(0, 4 * rows * 8, gpu)  # argsort + bincount over K*S int64 keys: a few passes
    gather = roofline_seconds(0, 2 * rows * d * b, gpu)
    exchange = LINKS[gpu.nvlink].latency + all_to_all_seconds(rows * d * b, shape.gpus, nvlink)  # counts, then rows
    active = min(shape.local_experts, rows)  # every local expert that gets a row
    experts = expert_ffn_seconds(shape, rows, active, gpu)
    combine = all_to_all_seconds(rows * d * b, shape.gpus, nvlink) + gather
    return {"gate": gate + sort, "dispatch": gather + exchange, "experts": experts, "combine": combine}


def dense_layers_seconds(shape: MoEShape, tokens: float, context: float, gpu: GPU) -> float:
    """Attention (projections and scores over `context` keys) and the dense FFNs, for `tokens` tokens."""
    d, b = shape.hidden, shape.dtype_bytes
    projections = shape.attention_layers * 4 * gemm_seconds(tokens, d, d, gpu, b)
    scores = shape.attention_layers * roofline_seconds(4 * tokens * context * d, 2 * context * d * b, gpu)
    ffn = shape.dense_layers * expert_ffn_seconds(shape, tokens, 1, gpu)
    return projections + scores + ffn


def forward_seconds(shape: MoEShape, gpu: GPU, tokens: float, context: float, policy: str) -> dict[str, float]:
    """One forward pass of `tokens` tokens per GPU: the dense part and the MoE layers' parts, summed over layers."""
    per_layer = moe_layer_seconds(shape, tokens, gpu, policy)
    parts = {phase: shape.moe_layers * seconds for phase, seconds in per_layer.items()}
    parts["dense"] = dense_layers_seconds(shape, tokens, context, gpu)
    parts["lm head"] = gemm_seconds(tokens, shape.hidden, shape.vocab, gpu, shape.dtype_bytes)
    return parts


def decode_step_seconds(
    shape: MoEShape, gpu: GPU, host_link: Link, batch: float, context: float, active: float, misses: float
) -> dict[str, float]:
    """One decoding step of `batch` sequences per GPU through the stack, with expert buffering: `active` local
    experts run per MoE layer call, `misses` of them are copied in over `host_link` (0: every expert resident)."""
    nvlink = LINKS[gpu.nvlink]
    d, b = shape.hidden, shape.dtype_bytes
    rows = shape.topk * batch
    exchange = 2 * all_to_all_seconds(rows * d * b, shape.gpus, nvlink) + nvlink.latency
    copies = move_experts(misses, shape.expert_bytes(), host_link).seconds
    stall = max(0.0, copies - exchange / 2)  # the copies overlap the dispatch all-to-all
    experts = expert_ffn_seconds(shape, rows, active, gpu)
    kv = shape.attention_layers * roofline_seconds(4 * batch * context * d, 2 * batch * context * d * b, gpu)
    dense = shape.dense_params() * b / (gpu.bandwidth * ACHIEVED_BANDWIDTH) + kv
    layers = shape.moe_layers
    return {"dense": dense, "experts": layers * experts, "all-to-all": layers * exchange, "stall": layers * stall}


def static_memory_bytes(shape: MoEShape, buffered_layers: int, slots: int | None) -> float:
    """Weights on one GPU: the replicated dense ones and its local experts, `buffered_layers` of the MoE layers
    keeping only `slots` experts on the device (None: every expert resident)."""
    resident = shape.moe_layers * shape.local_experts
    if slots is not None:
        resident -= buffered_layers * (shape.local_experts - min(slots, shape.local_experts))
    return (shape.dense_params() + resident * shape.expert_params()) * shape.dtype_bytes
