"""This rank's experts of one MoE layer, as stacked weights the gating policies run by local slot.

    experts = LocalExperts(cfg, [tensors of expert e for e in placement.local_experts(rank)])
    y_ND = experts(slot, x_ND, probs_N)        the expert at `slot` on its rows, routing probability applied

Why stacked tensors and not one module per expert: a policy calls one expert per slot per layer call, so the per-call
overhead is what is left after the matrix products. Here a call is addmm (fc1 + bias), the activation, addmm (fc2 +
bias) and one in-place scale of the D-wide output, with nothing allocated that is not needed.

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


class LocalExperts(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        experts: list[dict[str, torch.Tensor]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not experts:
            raise PipelineError("local experts: a rank must hold at least one expert of each MoE layer")
        self.activation = cfg.activation

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([tensors[name] for tensors in experts]).to(device=device, dtype=dtype).contiguous()

        self.w1_LF1D = nn.Parameter(stacked("fc1.weight"), requires_grad=False)
        self.b1_LF1 = nn.Parameter(stacked("fc1.bias"), requires_grad=False)
        self.w2_LDF = nn.Parameter(stacked("fc2.weight"), requires_grad=False)
        self.b2_LD = nn.Parameter(stacked("fc2.bias"), requires_grad=False)

    @property
    def num_local(self) -> int:
        return self.w1_LF1D.shape[0]

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights."""
        return sum(p[0].numel() * p.element_size() for p in self.parameters())

    def forward(self, slot: int, x_ND: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
        h_NF = activation(self.activation, torch.addmm(self.b1_LF1[slot], x_ND, self.w1_LF1D[slot].t()))
        y_ND = torch.addmm(self.b2_LD[slot], h_NF, self.w2_LDF[slot].t())
        return y_ND.mul_(probs_N.unsqueeze(-1).to(y_ND.dtype))
