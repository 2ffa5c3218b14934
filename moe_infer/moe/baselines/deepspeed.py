"""DeepSpeed's own MoE layer (`deepspeed.moe.layer.MoE`, deepspeed 0.19.8) as a block (moe_infer.moe.baselines),
loaded with an export's router and expert tensors: the static-capacity peer baseline of the engine.

    block = DeepSpeedBlock(cfg, router, experts, placement, capacity_factor=1.0, drop_tokens=False)
    y_TD, stats = block(x_TD)          every rank of the EP group calls it together, with its own T (possibly 0)

What DeepSpeed does (deepspeed/moe/sharded_moe.py, TopKGate + MOELayer; GShard's algorithm):
    logits_TE = x W^T in fp32 -> top1gating / top2gating / topkgating: each token's k experts, their combine weights
    and a slot in its expert's buffer of C rows; pairs past C are dropped (expert index -1)
    C = max(ceil(T / E * capacity_factor * k), min_capacity)   with drop_tokens=True
    C = the largest per-expert count, all-reduced MAX over the EP group   with drop_tokens=False (top-1: at most T)
    buffer [E, C, D] (zero rows in empty slots) -> equal-size all-to-all -> each local expert runs on its R*C rows
    -> all-to-all back -> y_TD = sum over the token's kept pairs of weight * expert output

What we set, and why:
    k = cfg.topk; capacity_factor = eval_capacity_factor (the block runs in eval mode); drop_tokens as asked.
    use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None: else the gate draws random numbers even in
    eval (random token selection, Gumbel noise on the 2nd expert) and the outputs are not reproducible.
    use_residual=False, use_tutel=False: the plain MoE layer. The experts are our DenseMLP (fc1 -> act -> fc2, biases
    included); DS applies the combine weight outside, p * (W2 h + b2), which equals the reference's p * W2 h + p * b2.
    min_capacity=1 by default (DS's MoE default is 4, a training-time floor): the capacity then follows
    capacity_factor as our static policy's does. Pass min_capacity=4 for DS's default.
    The EP group is the whole default world, made by DS's own `set_deepspeed_parallelism()` (which we must call: DS
    only builds and wires the group when asked). With one rank no process group is needed at all.

Router numerics against ours (moe_infer.model.moe.Router): DS top-1 = softmax over all experts then top-1 (our
router_pre_softmax=True); DS top-2 / top-k renormalise the k probabilities (router_pre_softmax=False). Other
combinations raise. DS's gate computes `F.linear(x, wg.weight, bias=None)` (it never calls `wg` as a module), so a
router bias needs a gate subclass, _BiasedTopKGate, whose forward is TopKGate.forward with the bias added; the pins
below catch an upgrade that changes the upstream code it copies.

Where DS assumes every rank brings the same number of tokens (training), and what we do instead:
    - drop_tokens=True: C comes from each rank's own T, and the all-to-all needs the same C everywhere (else gloo
      aborts on a size mismatch). We all-reduce T_max and set the gate's min_capacity to the C DS's formula gives for
      T_max tokens, so every rank uses max(ceil(T_max / E * cf * k), min_capacity): what DS would do if every rank
      brought T_max tokens.
    - top-1 also caps C at its own T (and asserts T >= min_capacity, so 0 tokens fail). Top-1 gets its rows padded with
      zeros up to T_max (at least min_capacity) and DS's `used_token` mask set to 0 on the padding: padded rows are
      routed nowhere (index -1, no slot, no count), take part only in the gate's matmul, and are cut from the output.
      Top-2 / top-k take T=0 and uneven T as they are once C is agreed.

Statistics (MoEStats, per call on this rank): from the gate's sparse routes (MOELayer always asks for them):
pairs_dropped = routes with expert index -1 among this rank's real tokens; padded_slots = E*C minus the kept pairs;
expert_rows = R*L*C (each local expert computes every source's C slots); bytes = the two equal-size all-to-alls of
[E, C, D] buffers, R-1 of R blocks leaving and arriving in each (the capacity / T_max all-reduces are not counted, as
in our own policies). Seconds per phase come from forward hooks on DS's gate and experts modules: forward start ->
gate done = gate (our T_max all-reduce and padding included); gate done -> experts start = dispatch (buffer + first
all-to-all); experts; experts done -> end = combine (second all-to-all, weighted sum, un-padding).

Shape legend: T tokens on this rank, D model dim, E experts, K experts per token, C capacity slots per expert, R ranks,
L experts per rank, S rows fed to DS (T plus top-1 padding).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe import sharded_moe
from deepspeed.moe.layer import MoE
from torch import nn

from moe_infer.collectives import all_reduce
from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import DenseMLP
from moe_infer.moe.experts import ExpertTensors, RouterTensors
from moe_infer.moe.stats import MoEStats, PhaseTimer
from moe_infer.placement import Placement
from pipeline.errors import PipelineError

# sha256 of inspect.getsource(upstream) in deepspeed 0.19.8: _BiasedTopKGate copies TopKGate.forward, and the T=0 /
# uneven-T handling and the statistics rely on how the gating functions and MOELayer.forward work there.
# fmt: off
UPSTREAM_PINS: dict[str, str] = {
    "deepspeed.moe.sharded_moe:TopKGate.forward":
        "374e6fd6d693707d9ee9a9923e45e85f1a479269984c2366db6c18bdc5fa57bb",
    "deepspeed.moe.sharded_moe:MOELayer.forward":
        "afff767ca100609fbb77fac97583e78a498d243aae5bef2dfbc5047f637a3309",
    "deepspeed.moe.sharded_moe:top1gating":
        "8d4e9a5027ec1d0f9139f2a1a077c61dfd4fea1f040d4b0d53fbca954f3a7267",
    "deepspeed.moe.sharded_moe:top2gating":
        "d8b2b1ab33321386731ee745ca9a7cea51f6f8c0c0a62b0048e8bb4af13df890",
    "deepspeed.moe.sharded_moe:topkgating":
        "ff50d8a107106b7e84505191674f6879f4504e1f6f5edb3eec7fc661a31e0c73",
    "deepspeed.moe.sharded_moe:_capacity":
        "813be07cbd8bac670d95a25769256e513dcf3c4a39a1792423f8f6686cbbac82",
    "deepspeed.moe.experts:Experts.forward":
        "16e6fcd7e1e18f8ca01535f5bbaa4373d81507545cdbfc098792d3df23fe50b1",
}
# fmt: on


class _BiasedTopKGate(sharded_moe.TopKGate):
    """TopKGate whose logits include the router bias: `wg` is a Linear with bias. Otherwise TopKGate.forward of
    deepspeed 0.19.8, less what eval never runs here (input jitter is training-only; wall_clock_breakdown is off)."""

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # upstream's signature
        logits = F.linear(input.float(), self.wg.weight.float(), self.wg.bias.float())
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            noisy = self.noisy_gate_policy if self.training else None
            return sharded_moe.top1gating(
                logits, capacity_factor, self.min_capacity, used_token, noisy, self.drop_tokens, self.use_rts,
                self.ep_group, sparse_routes, use_tutel,
            )  # fmt: skip
        if self.k == 2:
            return sharded_moe.top2gating(
                logits, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                self.top2_2nd_expert_sampling, sparse_routes,
            )  # fmt: skip
        return sharded_moe.topkgating(
            logits, self.k, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
            sparse_routes=sparse_routes,
        )  # fmt: skip


class DeepSpeedBlock(nn.Module):
    """One MoE layer's router and this rank's experts in DeepSpeed's MoE. With more than one rank, building it is a
    collective (DS creates its EP group with new_group on first use): every rank builds its blocks in the same order."""

    def __init__(
        self,
        cfg: ModelConfig,
        router: RouterTensors,
        experts: ExpertTensors,
        placement: Placement,
        capacity_factor: float,
        drop_tokens: bool,
        *,
        min_capacity: int = 1,
    ):
        super().__init__()
        _check_router(cfg, router)
        _check_placement(cfg, placement)
        if not capacity_factor > 0:
            raise PipelineError(f"deepspeed block: capacity_factor must be > 0, got {capacity_factor}")
        if min_capacity < 0:
            raise PipelineError(f"deepspeed block: min_capacity must be >= 0, got {min_capacity}")
        self.ranks, self.topk, self.num_experts = placement.ranks, cfg.topk, cfg.num_experts
        self.capacity_factor, self.drop_tokens, self.min_capacity = capacity_factor, drop_tokens, min_capacity
        self.rank = _ep_rank(placement)
        local = placement.local_experts(self.rank)
        if list(experts) != local:
            raise PipelineError(
                f"deepspeed block: rank {self.rank} must get the tensors of experts {local} (in local-slot order), "
                f"got {list(experts)}"
            )

        # Built on the meta device: no random init (nor a draw from the global RNG) for weights loaded right after.
        # DS deep-copies the expert module once per local expert.
        with torch.device("meta"):
            self.moe = MoE(
                hidden_size=cfg.hidden_size,
                expert=DenseMLP(cfg),
                num_experts=cfg.num_experts,
                ep_size=placement.ranks,
                k=cfg.topk,
                capacity_factor=capacity_factor,
                eval_capacity_factor=capacity_factor,
                min_capacity=min_capacity,
                use_residual=False,
                noisy_gate_policy=None,
                drop_tokens=drop_tokens,
                use_rts=False,
                use_tutel=False,
                top2_2nd_expert_sampling=False,
            )
            if cfg.router_bias:
                # The subclass adds behaviour only (no state of its own), so swapping the class of the built gate
                # keeps every setting MoE gave it.
                self.gate.__class__ = _BiasedTopKGate
                self.gate.wg = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=True)
        device = router["weight"].device
        self.moe.to_empty(device=device).eval().requires_grad_(False)
        with torch.no_grad():
            self.gate.wg.weight.copy_(router["weight"])
            if cfg.router_bias:
                self.gate.wg.bias.copy_(router["bias"])
            for slot, (expert_id, tensors) in enumerate(experts.items()):
                module = self.moe.deepspeed_moe.experts.deepspeed_experts[slot]
                try:
                    module.to(dtype=tensors["fc1.weight"].dtype).load_state_dict(tensors, strict=True)
                except (KeyError, RuntimeError) as err:
                    raise PipelineError(f"deepspeed block: expert {expert_id}'s tensors do not fit: {err}") from err
        self.expert_dtype = next(iter(experts.values()))["fc1.weight"].dtype  # the rows DS sends are in this dtype

        if placement.ranks > 1:
            # DS builds the EP group (named ep_size_R, shared by every MoE of that size) and hands it to the MOELayer
            # and the gate only here. Without it the all-to-alls still run (group None = the world) but the gate skips
            # the MAX all-reduce of C, so ranks with different counts abort in gloo on a size mismatch.
            self.moe.set_deepspeed_parallelism()
        self._timer: PhaseTimer | None = None
        self._routes = None
        self.gate.register_forward_hook(self._gate_done)
        self.moe.deepspeed_moe.experts.register_forward_pre_hook(self._experts_start)
        self.moe.deepspeed_moe.experts.register_forward_hook(self._experts_done)

    @property
    def gate(self) -> sharded_moe.TopKGate:
        return self.moe.deepspeed_moe.gate

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        num_tokens, d_model = x_TD.shape
        E, K, R = self.num_experts, self.topk, self.ranks
        stats = MoEStats(tokens=num_tokens, pairs_routed=num_tokens * K)
        self._timer, self._routes = PhaseTimer(stats, x_TD.device), None

        x_SD, used_S = x_TD.to(self.expert_dtype), None
        if self.drop_tokens or K == 1:
            max_tokens = self._max_over_group(num_tokens, x_TD.device)
            if self.drop_tokens:
                # The C DS would compute if every rank brought max_tokens, as the floor on every rank: one C for all.
                capacity = math.ceil(max_tokens / E * self.capacity_factor * K)
                self.gate.min_capacity = max(self.min_capacity, capacity)
            if K == 1:
                # top1gating caps C at the rows it gets and asserts rows >= min_capacity: give it the same row count
                # on every rank, the padding masked out by DS's own used_token (routed nowhere, counted nowhere).
                rows = max(max_tokens, self.gate.min_capacity)
                x_SD = torch.cat((x_SD, x_SD.new_zeros(rows - num_tokens, d_model)))
                used_S = (torch.arange(rows, device=x_TD.device) < num_tokens).to(torch.int64)  # mask1 is int64
        with torch.no_grad():
            y_SD, _, _ = self.moe(x_SD, used_S)
        y_TD = y_SD[:num_tokens]
        self._timer.lap("combine")
        self._timer = None

        # After the timing, so the phases are DS's alone: what the gate decided for this rank's real tokens.
        capacity, indices_KS = self._routes
        kept = int((indices_KS[:, :num_tokens] >= 0).sum())
        stats.pairs_dropped = num_tokens * K - kept
        stats.padded_slots = E * capacity - kept
        stats.expert_rows = E * capacity  # R ranks' blocks of L experts x C slots reach this rank's L experts
        block_bytes = (E // R) * capacity * d_model * y_SD.element_size()  # one rank's L x C x D block
        stats.bytes_sent = stats.bytes_received = 2 * (R - 1) * block_bytes
        return y_TD, stats

    def _max_over_group(self, value: int, device: torch.device) -> int:
        if self.ranks == 1:
            return value
        return all_reduce([value], "max", device=device)[0]

    # Hooks: outside our forward (no timer) they do nothing.
    def _gate_done(self, module, args, output):
        if self._timer is not None:
            self._timer.lap("gate")
            # MOELayer asks for sparse routes: (l_aux, C, E, indices [K, S] with -1 = dropped, locations, gates, counts)
            self._routes = (int(output[1]), output[3])

    def _experts_start(self, module, args):
        if self._timer is not None:
            self._timer.lap("dispatch")

    def _experts_done(self, module, args, output):
        if self._timer is not None:
            self._timer.lap("experts")


def _check_router(cfg: ModelConfig, router: RouterTensors) -> None:
    if cfg.topk == 1 and not cfg.router_pre_softmax:
        raise PipelineError(
            "deepspeed block: DeepSpeed's top-1 gate takes the softmax over all experts before choosing "
            "(router_pre_softmax=True); this model has topk=1 with router_pre_softmax=False, whose weight is always 1"
        )
    if cfg.topk > 1 and cfg.router_pre_softmax:
        raise PipelineError(
            f"deepspeed block: DeepSpeed's top-{cfg.topk} gate renormalises the {cfg.topk} chosen probabilities "
            f"(router_pre_softmax=False); this model has topk={cfg.topk} with router_pre_softmax=True"
        )
    if cfg.router_bias != ("bias" in router):
        raise PipelineError(
            f"deepspeed block: the config says router_bias={cfg.router_bias} but the router tensors "
            f"{'have' if 'bias' in router else 'lack'} a bias"
        )
    if tuple(router["weight"].shape) != (cfg.num_experts, cfg.hidden_size):
        raise PipelineError(
            f"deepspeed block: router weight is {tuple(router['weight'].shape)}, "
            f"expected [{cfg.num_experts}, {cfg.hidden_size}]"
        )


def _check_placement(cfg: ModelConfig, placement: Placement) -> None:
    if placement.num_experts != cfg.num_experts:
        raise PipelineError(
            f"deepspeed block: the placement has {placement.num_experts} experts, the model {cfg.num_experts}"
        )
    contiguous = Placement.contiguous(placement.num_experts, placement.ranks)
    if not (
        torch.equal(placement.rank_of_E, contiguous.rank_of_E)
        and torch.equal(placement.slot_of_E, contiguous.slot_of_E)
    ):
        raise PipelineError(
            "deepspeed block: DeepSpeed's MoE supports only the contiguous placement (rank r holds experts "
            f"r*L .. r*L+L-1 in order); got {[placement.local_experts(r) for r in range(placement.ranks)]}"
        )


def _ep_rank(placement: Placement) -> int:
    """This rank in the EP group (the whole default world); 0 with one rank, which needs no process group."""
    if placement.ranks == 1:
        return 0
    import deepspeed.comm

    if not (dist.is_initialized() and deepspeed.comm.is_initialized()):
        raise PipelineError(
            f"deepspeed block: the placement spans {placement.ranks} ranks but DeepSpeed's comm is not initialized: "
            "call pipeline.platform.init_distributed(use_deepspeed=True) first"
        )
    if dist.get_world_size() != placement.ranks:
        raise PipelineError(
            f"deepspeed block: the placement spans {placement.ranks} ranks but the default process group has "
            f"{dist.get_world_size()}; the EP group must be the whole world"
        )
    return dist.get_rank()
