"""This rank's experts of one MoE layer (the "experts" step of router -> dispatch -> experts -> combine), as stacked
weights run by local slot.

    experts = LocalExperts(cfg, [tensors of expert e for e in placement.local_experts(rank)])
    experts.prepare(active_L, overlapped)      which local experts this call runs (here: nothing to do, all resident)
    experts(rows)                              every local expert on its rows: rows.y_MD = experts(rows.x_MD)
    experts.products(x_MD, rows_L)             their two matrix products alone (the benchmark's floor)

`rows` (Rows) is what a dispatcher (moe_infer.moe.dispatch) hands over: the rows of every local expert, grouped by
local slot (rows_L[l] rows of slot l, in slot order), their routing probabilities, and the buffer the outputs go to.
`LocalExperts` keeps every local expert resident on the device. The runtime may serve a layer with another
ExpertStore instead: moe_infer.buffering.store.BufferedExperts, the same interface over a bounded set of device slots
(expert buffering). Both run the experts with ExpertKernel (moe_infer.moe.kernels): grouped GEMM at few rows per
expert, one expert at a time at many, the crossover measured once per device, dtype and shape (crossover.py).

Why stacked tensors and not one module per expert: the grouped kernel takes the experts as one [L, ...] tensor, and
the per-expert one slices it at no cost.

Shape legend: L local experts, M rows (grouped by local slot), D model dim, F ffn dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe_infer.model.config import ModelConfig
from moe_infer.moe.crossover import choose_kernel
from moe_infer.moe.kernels import ExpertKernel, ExpertWeights
from pipeline.errors import PipelineError

# The exported tensors a layer is built from (moe_infer.export_format): the router's {"weight": [E, D], "bias": [E] (if
# any)}, and this rank's experts by global id, each {"fc1.weight", "fc2.weight"} and (unless the export has no
# biases) {"fc1.bias", "fc2.bias"}.
RouterTensors = dict[str, torch.Tensor]
ExpertTensors = dict[int, dict[str, torch.Tensor]]


@dataclass
class Rows:
    """One call's rows for this rank's experts, grouped by local slot: what a dispatcher hands the experts."""

    x_MD: torch.Tensor
    probs_M: torch.Tensor  # fp32
    rows_L: list[int]  # rows of each local slot, in slot order
    y_MD: torch.Tensor  # the experts' outputs go here, row for row

    @property
    def active_L(self) -> list[int]:
        return [slot for slot, n in enumerate(self.rows_L) if n]


class ExpertStore(Protocol):
    """What a served MoE layer runs its experts with: LocalExperts, or the buffered store the runtime may choose."""

    def prepare(self, active_L: list[int], overlapped: bool) -> None: ...

    def __call__(self, rows: Rows) -> None: ...


def expert_kernel(
    cfg: ModelConfig,
    experts: list[dict[str, torch.Tensor]],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[ExpertKernel, torch.device, torch.dtype]:
    """(the kernel for these experts on `device` and `dtype`, that device, that dtype), the defaults being the
    tensors' own (moe_infer.moe.crossover). Chosen before the weights are stacked: it says their layout."""
    if not experts:
        raise PipelineError("local experts: a rank must hold at least one expert of each MoE layer")
    first = experts[0]["fc1.weight"]
    device, dtype = torch.device(device or first.device), dtype or first.dtype
    bias = "fc1.bias" in experts[0]
    kernel = choose_kernel(cfg.activation, cfg.hidden_size, cfg.ffn_hidden_size, bias, device, dtype)
    return kernel, device, dtype


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
        self.kernel, device, dtype = expert_kernel(cfg, experts, device, dtype)
        self.weights = ExpertWeights.stack(experts, device, dtype, self.kernel.layout)

    @property
    def num_local(self) -> int:
        return self.weights.num_experts

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights."""
        return self.weights.expert_bytes()

    def prepare(self, active_L: list[int], overlapped: bool) -> None:
        """The local slots this call will run, in the order it runs them (all resident here: nothing to do)."""

    def forward(self, rows: Rows) -> None:
        """Every local expert on its rows, into rows.y_MD."""
        self.kernel(self.weights, rows.x_MD, rows.probs_M, rows.rows_L, rows.y_MD)

    def run(self, x_MD: torch.Tensor, probs_M: torch.Tensor, rows_L: list[int], out_MD: torch.Tensor) -> torch.Tensor:
        """The experts on rows grouped by slot (rows_L per slot), into out_MD."""
        return self.kernel(self.weights, x_MD, probs_M, rows_L, out_MD)

    def products(self, x_MD: torch.Tensor, rows_L: list[int]) -> None:
        self.kernel.products(self.weights, x_MD, rows_L)
