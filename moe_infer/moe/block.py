"""The contract every MoE implementation the engine can serve fulfils: a "block" that takes this rank's tokens of one
MoE layer and returns their MoE outputs (router included, residual not), with the call's GatingStats.

    block = build_block(...)              dynamic / static (moe_infer.moe.layer) or a peer baseline (baselines/)
    y_TD, stats = block(x_TD)             every rank of the EP group calls it together, with its own T (possibly 0)

A block is built from the same exported tensors whatever its kind:
    router  {"weight": [E, D], "bias": [E] (if the export's router has one)}
    experts {global expert id: {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}} for this rank's experts only,
            in the placement's local-slot order

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moe_infer.moe.dispatch.common import GatingStats

RouterTensors = dict[str, torch.Tensor]
ExpertTensors = dict[int, dict[str, torch.Tensor]]


class MoEBlock(Protocol):
    def __call__(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, GatingStats]: ...
