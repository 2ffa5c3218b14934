"""The MoE layer as the engine serves it, in the model's place of its reference MoELayer (moe_infer.model.moe):

    x_TD ── router ──> probs_TK, experts_TK   the K experts of each token and their weights (moe_infer.model.moe)
         ── dispatch ─> routed                 rows to the ranks of their experts (moe_infer.moe.dispatch)
         ── experts ──> routed.rows.y_MD        each local expert on its rows (moe_infer.moe.experts)
         ── combine ──> y_TD                   outputs back to their tokens, each token's K outputs summed

    layer = build_moe_layer("dynamic", "decoder.layers.2", cfg, router, experts, placement)     see POLICIES
    model.decoder.layers["2"].moe = layer
    share_token_counts(served layers in call order)    one token-count agreement per forward pass of a stack
    layer.totals, layer.last                  MoEStats summed over every call, and of the last call

    dynamic    ServedMoELayer: our router, DynamicDispatch (sort, count, variable all-to-all), LocalExperts
    static     ServedMoELayer: our router, StaticDispatch (capacity fraction C, padded buffers, drops), LocalExperts
               (for either, the caller may pass another expert store: the runtime's BufferedExperts, expert buffering)
    deepspeed  PeerMoELayer around deepspeed.moe.layer.MoE (TopKGate): capacity factor and drop_tokens from the options
    megatron   PeerMoELayer around megatron-core's MoELayer, dropless, alltoall dispatcher (imported only when chosen)

Every kind is built from the same exported tensors (moe_infer.moe.experts.RouterTensors / ExpertTensors): the router,
and this rank's experts only, by global id in the placement's local-slot order. Every rank of the EP group calls the
layer together, each with its own tokens (possibly none).

Shape legend: B batch, S positions, T tokens (B*S), K experts per token, D model dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_infer.model.config import ModelConfig
from moe_infer.model.moe import Router
from moe_infer.moe.baselines import MoEBlock
from moe_infer.moe.dispatch import DynamicDispatch, StaticDispatch
from moe_infer.moe.dispatch.tokens import TokenCounts
from moe_infer.moe.experts import ExpertStore, ExpertTensors, LocalExperts, RouterTensors
from moe_infer.moe.stats import MoEStats, PhaseTimer
from moe_infer.placement import Placement
from pipeline.errors import PipelineError

POLICIES = ("dynamic", "static", "deepspeed", "megatron")


@dataclass(frozen=True)
class MoEOptions:
    """What the kinds need besides the weights. None: the export's own setting."""

    capacity_fraction: float | None = None  # static: slots per expert as a fraction of the tokens per rank
    capacity_factor: float = 1.0  # deepspeed: DeepSpeed's capacity factor (capacity = ceil(k * T / E * factor))
    drop_tokens: bool = True  # deepspeed: False pads every expert to the largest count instead of dropping


def load_router(cfg: ModelConfig, tensors: RouterTensors, device: torch.device | str = "cpu") -> Router:
    router = Router(cfg)
    router.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}, assign=True)
    return router.requires_grad_(False)


class ServedMoE(nn.Module):
    """What stands where the model's MoELayer stood, ours or a peer's: its name and its figures."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.totals, self.calls, self.last = MoEStats(), 0, None

    @property
    def buffer_stats(self):
        """The expert store's BufferStats when this layer buffers its experts (moe_infer.buffering.store), else None."""
        return None

    def reset_stats(self) -> None:
        """Zero the layer's figures (the expert store's included)."""
        self.totals, self.calls, self.last = MoEStats(), 0, None

    def _count(self, stats: MoEStats) -> None:
        self.totals.add(stats)
        self.calls += 1
        self.last = stats


class ServedMoELayer(ServedMoE):
    """Our router, a dispatcher (dynamic or static) and this rank's expert store."""

    recording = False  # set by the runtime's LoadRecorder: keep each call's expert counts in `counts`
    counts: list[torch.Tensor]
    # Each called with every call's expert counts (int64 [E], this rank's tokens): the online re-balancer's window.
    count_observers: list

    def __init__(self, name: str, router: Router, dispatcher: DynamicDispatch | StaticDispatch, experts: ExpertStore):
        super().__init__(name)
        self.router, self.dispatcher, self.experts = router, dispatcher, experts
        self.num_experts, self.topk = router.weight.shape[0], router.topk
        self.count_observers = []

    @property
    def buffer_stats(self):
        return getattr(self.experts, "stats", None)

    def reset_stats(self) -> None:
        super().reset_stats()
        if self.buffer_stats is not None:
            self.experts.reset_stats()

    def expert_counts(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """int64 [E]: this call's (token, expert) pairs per global expert, for load histories."""
        return torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD if x_BSD.dim() == 2 else x_BSD.reshape(-1, x_BSD.shape[-1])
        stats = MoEStats(tokens=x_TD.shape[0], pairs_routed=x_TD.shape[0] * self.topk)
        timer = PhaseTimer(stats, x_TD.device)  # the "gate" phase: the router and the dispatcher's routing work
        routed = None
        if isinstance(self.dispatcher, DynamicDispatch):  # one rank: router, sort and gather in one call, if it can
            routed = self.dispatcher.route_local(x_TD, self.router, self.experts.prepare, timer)
        if routed is not None:
            experts_TK = routed.experts_TK
        else:
            probs_TK, experts_TK = self.router(x_TD)
            routed = self.dispatcher.dispatch(x_TD, probs_TK, experts_TK, self.experts.prepare, timer)
        self.experts(routed.rows)
        timer.lap("experts")
        y_TD = self.dispatcher.combine(routed)
        timer.lap("combine")
        if self.recording or self.count_observers:
            counts_E = self.expert_counts(experts_TK).cpu()
            if self.recording:
                self.counts.append(counts_E)
            for observe in self.count_observers:
                observe(counts_E)
        self._count(stats)
        if y_TD.dtype != x_TD.dtype:
            y_TD = y_TD.to(x_TD.dtype)
        # (A cast or view with nothing to do is still a torch op, and each op costs time on a cold cache: see
        # moe_infer.model.routing_kernels. So neither runs unless needed, here and at the top.)
        return y_TD if x_BSD.dim() == 2 else y_TD.view_as(x_BSD)


class PeerMoELayer(ServedMoE):
    """A peer's whole MoE layer (router to combine inside its own module), called as a block on this rank's tokens."""

    def __init__(self, name: str, block: MoEBlock):
        super().__init__(name)
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_TD, stats = self.block(x_BSD.reshape(-1, x_BSD.shape[-1]))
        self._count(stats)
        return y_TD.view_as(x_BSD)


def share_token_counts(layers: list[ServedMoE]) -> None:
    """One token-count agreement per forward pass of each stack instead of one per MoE layer: the first of our MoE
    layers of a stack ("encoder", "decoder": the first part of the layer's name) agrees on the counts, the later ones
    read them (moe_infer.moe.dispatch.tokens). `layers` in the order a forward pass calls them (the model's module
    order). A layer that is never linked agrees on its own at every call."""
    leaders: dict[str, TokenCounts] = {}
    for layer in layers:
        if isinstance(layer, ServedMoELayer):
            stack = layer.name.split(".")[0]
            if stack in leaders:
                layer.dispatcher.tokens.follow(leaders[stack])
            else:
                leaders[stack] = layer.dispatcher.tokens.counts


def build_moe_layer(
    kind: str,
    name: str,
    cfg: ModelConfig,
    router: RouterTensors,
    experts: ExpertTensors,
    placement: Placement,
    options: MoEOptions = MoEOptions(),
    export_capacity_fraction: float = 1.0,
    store: ExpertStore | None = None,
) -> ServedMoE:
    """One MoE layer of the given kind; `experts` holds this rank's experts (global id -> tensors). Dynamic and static
    run them from `store` (default: LocalExperts, every local expert resident)."""
    if kind in ("dynamic", "static"):
        rank = dist.get_rank() if placement.ranks > 1 else 0
        device = next(iter(experts.values()))["fc1.weight"].device
        if store is None:
            store = LocalExperts(cfg, [experts[e] for e in placement.local_experts(rank)])
        if kind == "dynamic":
            dispatcher = DynamicDispatch(placement)
        else:
            fraction = options.capacity_fraction
            dispatcher = StaticDispatch(placement, fraction if fraction is not None else export_capacity_fraction)
        return ServedMoELayer(name, load_router(cfg, router, device), dispatcher, store)
    if store is not None:
        raise PipelineError(
            f"expert buffering (--expert-slots) works with the dynamic and static policies, not {kind!r}: the "
            "baselines keep every expert in their own modules"
        )
    if kind == "deepspeed":
        from moe_infer.moe.baselines.deepspeed import DeepSpeedBlock

        block = DeepSpeedBlock(cfg, router, experts, placement, options.capacity_factor, options.drop_tokens)
        return PeerMoELayer(name, block)
    if kind == "megatron":
        from moe_infer.moe.baselines.megatron import MegatronBlock

        return PeerMoELayer(name, MegatronBlock(cfg, router, experts, placement))
    raise PipelineError(f"unknown MoE policy {kind!r}; expected one of {', '.join(POLICIES)}")
