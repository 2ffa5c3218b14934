"""The MoE layer as the engine serves it: one of four implementations ("blocks") on the same exported weights, behind
one module that the model calls in place of its reference MoELayer.

    block = build_block("dynamic", cfg, router, experts, placement)          see POLICIES
    model.decoder.layers["2"].moe = ServedMoELayer(block, "decoder.layers.2")
    layer.totals                                                              GatingStats summed over every call

    dynamic    our router + DynamicGating (sort, count, variable all-to-all) + LocalExperts
    static     our router + StaticGating (capacity fraction C, padded buffers, drops) + LocalExperts
               (either with BufferedExperts instead when BlockOptions.expert_slots asks for expert buffering)
    deepspeed  deepspeed.moe.layer.MoE (TopKGate), capacity factor and drop_tokens from the options
    megatron   megatron-core's MoELayer, dropless, alltoall dispatcher (imported only when chosen)

Shape legend: B batch, S positions, T tokens (B*S), K experts per token, D model dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_infer.collectives import clock
from moe_infer.model.config import ModelConfig
from moe_infer.model.moe import Router
from moe_infer.moe.block import ExpertTensors, MoEBlock, RouterTensors
from moe_infer.moe.dispatch import DynamicGating, GatingStats, StaticGating
from moe_infer.moe.experts import LocalExperts
from moe_infer.placement import Placement
from pipeline.errors import PipelineError

POLICIES = ("dynamic", "static", "deepspeed", "megatron")


@dataclass(frozen=True)
class BlockOptions:
    """What the policies need besides the weights. None: the export's own setting."""

    capacity_fraction: float | None = None  # static: slots per expert as a fraction of the tokens per rank
    capacity_factor: float = 1.0  # deepspeed: DeepSpeed's capacity factor (capacity = ceil(k * T / E * factor))
    drop_tokens: bool = True  # deepspeed: False pads every expert to the largest count instead of dropping
    # dynamic / static: device slots per MoE layer for expert buffering (moe_infer.buffering.store); None, or at least
    # the rank's local experts: every expert resident (buffering off)
    expert_slots: int | None = None
    eviction: str = "paper"  # which expert leaves a full set of slots (moe_infer.buffering.store.ENGINE_EVICTIONS)


def load_router(cfg: ModelConfig, tensors: RouterTensors, device: torch.device | str = "cpu") -> Router:
    router = Router(cfg)
    router.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}, assign=True)
    return router.requires_grad_(False)


class PolicyBlock(nn.Module):
    """Our router, a gating policy (dynamic or static) and this rank's experts."""

    def __init__(
        self,
        cfg: ModelConfig,
        router: RouterTensors,
        experts: ExpertTensors,
        placement: Placement,
        policy,
        options: BlockOptions = BlockOptions(),
    ):
        super().__init__()
        rank = dist.get_rank() if placement.ranks > 1 else 0
        device = next(iter(experts.values()))["fc1.weight"].device
        self.router = load_router(cfg, router, device)
        local = [experts[e] for e in placement.local_experts(rank)]
        if options.expert_slots is not None and options.expert_slots < len(local):
            from moe_infer.buffering.store import BufferedExperts

            self.experts = BufferedExperts(cfg, local, options.expert_slots, options.eviction, device)
        else:
            self.experts = LocalExperts(cfg, local)
        self.policy, self.num_experts = policy, cfg.num_experts

    def expert_counts(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """int64 [E]: this call's (token, expert) pairs per global expert, for load histories."""
        return torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, GatingStats]:
        start = clock(x_TD.device)
        probs_TK, experts_TK = self.router(x_TD)
        routed = clock(x_TD.device)
        y_TD, stats = self.policy(x_TD, probs_TK, experts_TK, self.experts)
        stats.seconds["gate"] += routed - start
        if self.recording:
            self.counts.append(self.expert_counts(experts_TK).cpu())
        return y_TD.to(x_TD.dtype), stats

    recording = False  # set by LoadRecorder (moe_infer.engine.trace): keep each call's expert counts in `counts`
    counts: list[torch.Tensor]


def build_block(
    kind: str,
    cfg: ModelConfig,
    router: RouterTensors,
    experts: ExpertTensors,
    placement: Placement,
    options: BlockOptions = BlockOptions(),
    export_capacity_fraction: float = 1.0,
) -> MoEBlock:
    """One MoE layer's block of the given kind; `experts` holds this rank's experts (global id -> tensors)."""
    if kind == "dynamic":
        return PolicyBlock(cfg, router, experts, placement, DynamicGating(placement), options)
    if kind == "static":
        fraction = options.capacity_fraction if options.capacity_fraction is not None else export_capacity_fraction
        return PolicyBlock(cfg, router, experts, placement, StaticGating(placement, fraction), options)
    if options.expert_slots is not None:
        raise PipelineError(
            f"expert buffering (--expert-slots) works with the dynamic and static policies, not {kind!r}: the "
            "baselines keep every expert in their own modules"
        )
    if kind == "deepspeed":
        from moe_infer.moe.baselines.deepspeed import DeepSpeedBlock

        return DeepSpeedBlock(cfg, router, experts, placement, options.capacity_factor, options.drop_tokens)
    if kind == "megatron":
        from moe_infer.moe.baselines.megatron import MegatronBlock

        return MegatronBlock(cfg, router, experts, placement)
    raise PipelineError(f"unknown MoE policy {kind!r}; expected one of {', '.join(POLICIES)}")


class ServedMoELayer(nn.Module):
    """Stands where the model's MoELayer stood: reshapes [B, S, D] to tokens, calls the block, keeps the figures."""

    def __init__(self, block: MoEBlock, name: str):
        super().__init__()
        self.block, self.name = block, name
        self.totals, self.calls = GatingStats(), 0

    @property
    def buffer_stats(self):
        """The expert store's BufferStats when this layer buffers its experts (moe_infer.buffering.store), else None."""
        return getattr(getattr(self.block, "experts", None), "stats", None)

    def reset_stats(self) -> None:
        """Zero the layer's figures, the expert store's included."""
        self.totals, self.calls = GatingStats(), 0
        if self.buffer_stats is not None:
            self.block.experts.reset_stats()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_TD, stats = self.block(x_BSD.reshape(-1, x_BSD.shape[-1]))
        self.totals.add(stats)
        self.calls += 1
        return y_TD.view_as(x_BSD)
