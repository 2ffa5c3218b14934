"""This rank's experts of one MoE layer (the "experts" step of router -> dispatch -> experts -> combine), as stacked
weights run by local slot.

    experts = LocalExperts(cfg, [tensors of expert e for e in placement.local_experts(rank)])
    experts.prepare(active_L, overlapped)      which local experts this call runs (here: nothing to do, all resident)
    experts(routed)                            every expert the dispatcher routed rows to, on those rows
    y_ND = experts.run(slot, x_ND, probs_N)    one expert on rows, probability applied (or into out_ND=)
    experts.products(slot, x_ND)               its two matrix products alone (the benchmark's floor)

`LocalExperts` keeps every local expert resident on the device. The runtime may serve a layer with another
ExpertStore instead: moe_infer.buffering.store.BufferedExperts, the same interface over a bounded set of device slots
(expert buffering). Both run the expert with `ExpertKernel`. `routed` comes from a dispatcher (moe_infer.moe.dispatch):
its expert_inputs() are (slot, x_ND, probs_N, out_ND) per expert that runs, expert_output(slot, y_ND) takes the result.

Why stacked tensors and not one module per expert: a layer calls one expert per slot per call, so the per-call
overhead is what is left after the matrix products, and it should be nothing but the expert's own arithmetic.

Two kernels, chosen once per layer (`ExpertKernel.choose`):
    onednn  (CPU, fp32) oneDNN's linear with fused post-ops, the primitive torch's inductor emits for CPU linears:
            fc1 + bias + GELU in one pass, fc2 + bias then x probability in one pass. Against a torch.addmm / F.gelu /
            mul_ sequence this saves the separate passes over the [N, F] activation, and oneDNN's small-GEMM path
            beats MKL's sgemm at the 100-200-row products experts get (measured in moe_infer.bench.layer).
            The weights are packed once into oneDNN's blocked layout (another ~10% at these shapes; the plain copies
            are then released). It is an internal torch op, so it is checked against the addmm kernel when the layer
            is built and dropped (with the reason kept in `note`) if it is missing or disagrees.
    addmm   everywhere else (CUDA, bf16): addmm (fc1 + bias), activation, addmm (fc2 + bias) into out_ND, scale.

The probability is applied to the output: p * (W2 h + b2) = W2 (h p) + b2 p, the reference's form (moe_infer.model.moe,
megatron's per-token scale) up to fp32 rounding, at D columns per row instead of F.

Shape legend: L local experts, N rows, D model dim, F ffn dim (F1 = fc1 rows: F, or 2F for swiglu).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe_infer.export_format import EXPERT_TENSORS
from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import activation
from pipeline.errors import PipelineError

_TYPICAL_ROWS = 128  # rows per expert call that oneDNN tunes the packed weight layout for

# The exported tensors a layer is built from (moe_infer.export_format): the router's {"weight": [E, D], "bias": [E] (if
# any)}, and this rank's experts by global id, each {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}.
RouterTensors = dict[str, torch.Tensor]
ExpertTensors = dict[int, dict[str, torch.Tensor]]

# One expert's weights as a kernel runs them: (fc1 weight, fc1 bias, fc2 weight, fc2 bias); the weights are in
# oneDNN's packed layout under the onednn kernel.
ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Routed(Protocol):
    """One call's rows for this rank's experts, as a dispatcher hands them over (moe_infer.moe.dispatch)."""

    def expert_inputs(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]: ...

    def expert_output(self, slot: int, y_ND: torch.Tensor) -> None: ...


class ExpertStore(Protocol):
    """What a served MoE layer runs its experts with: LocalExperts, or the buffered store the runtime may choose."""

    def prepare(self, active_L: list[int], overlapped: bool) -> None: ...

    def __call__(self, routed: Routed) -> None: ...


def stack_experts(
    experts: list[dict[str, torch.Tensor]], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> ExpertWeights:
    """The experts' four tensors stacked over L (w1 [L, F1, D], b1 [L, F1], w2 [L, D, F], b2 [L, D])."""
    if not experts:
        raise PipelineError("local experts: a rank must hold at least one expert of each MoE layer")
    first = experts[0]["fc1.weight"]
    device, dtype = device or first.device, dtype or first.dtype

    def tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        # TEMPORARY (until the grouped-GEMM kernel takes experts without biases): an export with model.bias false has
        # no fc1.bias / fc2.bias; a zero bias adds exactly nothing.
        if name in tensors or not name.endswith(".bias"):
            return tensors[name]
        weight = tensors[name.replace(".bias", ".weight")]
        return weight.new_zeros(weight.shape[0])

    return tuple(
        torch.stack([tensor(tensors, name) for tensors in experts]).to(device=device, dtype=dtype).contiguous()
        for name in EXPERT_TENSORS
    )


@dataclass(frozen=True)
class ExpertKernel:
    name: str  # "onednn" or "addmm"
    activation: str
    ffn: int  # F
    note: str = ""  # why oneDNN is not used, when it is not

    @classmethod
    def choose(cls, cfg: ModelConfig, sample: ExpertWeights) -> ExpertKernel:
        """oneDNN on CPU in fp32 if this torch has it and it gives the addmm kernel's result on a few rows of
        `sample` (one expert's plain weights); addmm otherwise."""
        addmm = cls("addmm", cfg.activation, cfg.ffn_hidden_size)
        w1 = sample[0]
        if w1.device.type != "cpu" or w1.dtype != torch.float32:
            return addmm
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return addmm.with_note("oneDNN linear is not available in this torch build")
        onednn = cls("onednn", cfg.activation, cfg.ffn_hidden_size)
        gen = torch.Generator().manual_seed(0)
        x_ND = torch.randn(5, w1.shape[1], generator=gen)
        p_N = torch.rand(5, generator=gen)
        expected = addmm(sample, x_ND, p_N)
        try:
            with torch.inference_mode():
                got = onednn(onednn.pack(sample), x_ND, p_N)
        except (RuntimeError, NotImplementedError) as err:
            return addmm.with_note(f"oneDNN linear failed: {err}")
        scale = float(expected.abs().max()) or 1.0
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale):
            return addmm.with_note(f"oneDNN linear disagrees with addmm by {float((got - expected).abs().max()):.2e}")
        return onednn

    def with_note(self, note: str) -> ExpertKernel:
        return ExpertKernel(self.name, self.activation, self.ffn, note)

    def pack(self, weights: ExpertWeights) -> ExpertWeights:
        """One expert's plain weights in the layout this kernel runs (a new tensor for each packed weight)."""
        if self.name != "onednn":
            return weights
        w1, b1, w2, b2 = weights
        with torch.inference_mode():
            # The layout oneDNN picks depends on a typical row count; any count works with it.
            reorder = torch.ops.mkldnn._reorder_linear_weight
            return reorder(w1, _TYPICAL_ROWS), b1, reorder(w2, _TYPICAL_ROWS), b2

    def __call__(
        self, weights: ExpertWeights, x_ND: torch.Tensor, probs_N: torch.Tensor, out_ND: torch.Tensor | None = None
    ) -> torch.Tensor:
        w1, b1, w2, b2 = weights
        p_N1 = probs_N.unsqueeze(-1).to(x_ND.dtype)
        if self.name == "onednn":
            if self.activation == "gelu":
                h_NF = _linear(x_ND, w1, b1, "gelu", "none")  # algorithm "none": the exact (erf) GELU, not tanh
            else:
                h_NF = activation(self.activation, _linear(x_ND, w1, b1))
            # Binary post-op: (h W2^T + b2) * p in the same pass (p broadcast over D as an expanded view).
            y_ND = torch.ops.mkldnn._linear_pointwise.binary(h_NF, p_N1.expand(-1, b2.shape[0]), w2, b2, "mul")
            return y_ND if out_ND is None else out_ND.copy_(y_ND)
        h_NF = activation(self.activation, torch.addmm(b1, x_ND, w1.t()))
        return torch.addmm(b2, h_NF, w2.t(), out=out_ND).mul_(p_N1)

    def products(self, weights: ExpertWeights, x_ND: torch.Tensor) -> torch.Tensor:
        """The expert's two matrix products and nothing else (no bias, activation or probability): the floor an MoE
        layer's expert phase is measured against."""
        w1, _, w2, _ = weights
        if self.name == "onednn":
            h_NF = _linear(x_ND, w1, None)
            return _linear(h_NF[:, : self.ffn] if self.activation == "swiglu" else h_NF, w2, None)
        h_NF = torch.mm(x_ND, w1.t())
        return torch.mm(h_NF[:, : self.ffn] if self.activation == "swiglu" else h_NF, w2.t())


def _linear(x, w, b, post_op: str = "none", algorithm: str = ""):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, post_op, [], algorithm)


class LocalExperts(nn.Module):
    """Every local expert resident: nothing to prepare, nothing to copy."""

    def __init__(
        self,
        cfg: ModelConfig,
        experts: list[dict[str, torch.Tensor]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        w1_LF1D, b1_LF1, w2_LDF, b2_LD = stack_experts(experts, device, dtype)
        self.b1_LF1 = nn.Parameter(b1_LF1, requires_grad=False)
        self.b2_LD = nn.Parameter(b2_LD, requires_grad=False)
        self.kernel = ExpertKernel.choose(cfg, (w1_LF1D[0], b1_LF1[0], w2_LDF[0], b2_LD[0]))
        self._expert_bytes = sum(t[0].numel() * t.element_size() for t in (w1_LF1D, b1_LF1, w2_LDF, b2_LD))
        # Per slot, (fc1, fc2) weights as the kernel runs them: views of the stacks, or oneDNN's packed copies (the
        # plain stacks are then released, as they would only double the memory).
        self.weights_L = [
            self.kernel.pack((w1_LF1D[s], b1_LF1[s], w2_LDF[s], b2_LD[s]))[::2] for s in range(b1_LF1.shape[0])
        ]

    @property
    def num_local(self) -> int:
        return self.b1_LF1.shape[0]

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights."""
        return self._expert_bytes

    def weights(self, slot: int) -> ExpertWeights:
        w1, w2 = self.weights_L[slot]
        return w1, self.b1_LF1[slot], w2, self.b2_LD[slot]

    def prepare(self, active_L: list[int], overlapped: bool) -> None:
        """The local slots this call will run, in the order it runs them (all resident here: nothing to do)."""

    def forward(self, routed: Routed) -> None:
        """Each expert the dispatcher routed rows to, on its rows (in the order `prepare` was told)."""
        for slot, x_ND, probs_N, out_ND in routed.expert_inputs():
            routed.expert_output(slot, self.kernel(self.weights(slot), x_ND, probs_N, out_ND))

    def run(
        self, slot: int, x_ND: torch.Tensor, probs_N: torch.Tensor, out_ND: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The expert at `slot` on `x_ND`, into `out_ND` (rows x D, contiguous) when given, else a new tensor."""
        return self.kernel(self.weights(slot), x_ND, probs_N, out_ND)

    def products(self, slot: int, x_ND: torch.Tensor) -> torch.Tensor:
        return self.kernel.products(self.weights(slot), x_ND)
