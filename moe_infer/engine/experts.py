"""This rank's experts of one MoE layer, as stacked weights the gating policies run by local slot.

    experts = LocalExperts(cfg, [tensors of expert e for e in placement.local_experts(rank)])
    y_ND = experts(slot, x_ND, probs_N)        the expert at `slot` on its rows, probability applied (or into out_ND=)
    experts.products(slot, x_ND)               its two matrix products alone (the benchmark's floor)

Why stacked tensors and not one module per expert: a policy calls one expert per slot per layer call, so the per-call
overhead is what is left after the matrix products, and it should be nothing but the expert's own arithmetic.

Two kernels, chosen once per layer:
    onednn  (CPU, fp32) oneDNN's linear with fused post-ops, the primitive torch's inductor emits for CPU linears:
            fc1 + bias + GELU in one pass, fc2 + bias then x probability in one pass. Against a torch.addmm / F.gelu /
            mul_ sequence this saves the separate passes over the [N, F] activation, and oneDNN's small-GEMM path
            beats MKL's sgemm at the 100-200-row products experts get (measured in moe_infer.engine.layer_bench).
            The weights are packed once into oneDNN's blocked layout (another ~10% at these shapes; the plain copies
            are then released). It is an internal torch op, so it is checked against the addmm kernel when the layer
            is built and dropped (with the reason kept in `kernel_note`) if it is missing or disagrees.
    addmm   everywhere else (CUDA, bf16): addmm (fc1 + bias), activation, addmm (fc2 + bias) into out_ND, scale.

The probability is applied to the output: p * (W2 h + b2) = W2 (h p) + b2 p, the reference's form (moe_infer.model.moe,
megatron's per-token scale) up to fp32 rounding, at D columns per row instead of F.

Shape legend: L local experts, N rows, D model dim, F ffn dim (F1 = fc1 rows: F, or 2F for swiglu).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import activation
from pipeline.errors import PipelineError

EXPERT_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_TYPICAL_ROWS = 128  # rows per expert call that oneDNN tunes the packed weight layout for


class LocalExperts(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        experts: list[dict[str, torch.Tensor]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not experts:
            raise PipelineError("local experts: a rank must hold at least one expert of each MoE layer")
        self.activation, self.ffn = cfg.activation, cfg.ffn_hidden_size
        first = experts[0]["fc1.weight"]
        device, dtype = device or first.device, dtype or first.dtype

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([tensors[name] for tensors in experts]).to(device=device, dtype=dtype).contiguous()

        self.w1_LF1D = nn.Parameter(stacked("fc1.weight"), requires_grad=False)
        self.b1_LF1 = nn.Parameter(stacked("fc1.bias"), requires_grad=False)
        self.w2_LDF = nn.Parameter(stacked("fc2.weight"), requires_grad=False)
        self.b2_LD = nn.Parameter(stacked("fc2.bias"), requires_grad=False)
        self._expert_bytes = sum(p[0].numel() * p.element_size() for p in self.parameters())
        self.kernel, self.kernel_note = "addmm", ""
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (fc1, fc2) weights in oneDNN's blocked layout
        if self.w1_LF1D.device.type == "cpu" and dtype == torch.float32:
            self.kernel, self.kernel_note, self.packed = _try_onednn(self)
        if self.packed:  # the plain weights would only double the memory from here on
            self.w1_LF1D, self.w2_LDF = None, None

    @property
    def num_local(self) -> int:
        return self.b1_LF1.shape[0]

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights."""
        return self._expert_bytes

    def forward(
        self, slot: int, x_ND: torch.Tensor, probs_N: torch.Tensor, out_ND: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The expert at `slot` on its rows, into `out_ND` (rows x D, contiguous) when given, else a new tensor."""
        p_N1 = probs_N.unsqueeze(-1).to(x_ND.dtype)
        if self.kernel == "onednn":
            y_ND = _onednn_expert(self, slot, x_ND, p_N1)
            return y_ND if out_ND is None else out_ND.copy_(y_ND)
        h_NF = activation(self.activation, torch.addmm(self.b1_LF1[slot], x_ND, self.w1_LF1D[slot].t()))
        y_ND = torch.addmm(self.b2_LD[slot], h_NF, self.w2_LDF[slot].t(), out=out_ND)
        return y_ND.mul_(p_N1)

    def products(self, slot: int, x_ND: torch.Tensor) -> torch.Tensor:
        """The expert's two matrix products and nothing else (no bias, activation or probability), with the kernel
        `forward` uses: the floor an MoE layer's expert phase is measured against."""
        if self.kernel == "onednn":
            w1, w2 = self.packed[slot]
            h_NF = _linear(x_ND, w1, None)
            return _linear(h_NF[:, : self.ffn] if self.activation == "swiglu" else h_NF, w2, None)
        h_NF = torch.mm(x_ND, self.w1_LF1D[slot].t())
        return torch.mm(h_NF[:, : self.ffn] if self.activation == "swiglu" else h_NF, self.w2_LDF[slot].t())


def _linear(x, w, b, post_op: str = "none", algorithm: str = ""):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, post_op, [], algorithm)


def _onednn_expert(
    experts: LocalExperts, slot: int, x_ND: torch.Tensor, p_N1: torch.Tensor, packed: tuple | None = None
) -> torch.Tensor:
    w1, w2 = packed or experts.packed[slot]
    b1, b2 = experts.b1_LF1[slot], experts.b2_LD[slot]
    if experts.activation == "gelu":
        h_NF = _linear(x_ND, w1, b1, "gelu", "none")  # algorithm "none": the exact (erf) GELU, not tanh
    else:
        h_NF = activation(experts.activation, _linear(x_ND, w1, b1))
    # Binary post-op: (h W2^T + b2) * p in the same pass (p broadcast over D as an expanded view).
    return torch.ops.mkldnn._linear_pointwise.binary(h_NF, p_N1.expand(-1, b2.shape[0]), w2, b2, "mul")


def _try_onednn(experts: LocalExperts) -> tuple[str, str, list]:
    """oneDNN with weights packed once in its blocked layout (so no call re-lays them out), if this torch has it
    and it gives the addmm kernel's result on a few rows of slot 0."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "addmm", "oneDNN linear is not available in this torch build", []
    gen = torch.Generator().manual_seed(0)
    x_ND = torch.randn(5, experts.w1_LF1D.shape[2], generator=gen)
    p_N = torch.rand(5, generator=gen)
    expected = experts.forward(0, x_ND, p_N)  # still the addmm kernel
    try:
        with torch.inference_mode():
            # The layout oneDNN picks depends on a typical row count; any count works with it.
            packed = [
                tuple(
                    torch.ops.mkldnn._reorder_linear_weight(w[slot], _TYPICAL_ROWS)
                    for w in (experts.w1_LF1D, experts.w2_LDF)
                )
                for slot in range(experts.num_local)
            ]
            got = _onednn_expert(experts, 0, x_ND, p_N.unsqueeze(-1), packed[0])
    except (RuntimeError, NotImplementedError) as err:
        return "addmm", f"oneDNN linear failed: {err}", []
    scale = float(expected.abs().max()) or 1.0
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale):
        return "addmm", f"oneDNN linear disagrees with addmm by {float((got - expected).abs().max()):.2e}", []
    return "onednn", "", packed
