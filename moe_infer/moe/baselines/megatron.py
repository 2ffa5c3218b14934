"""megatron-core 0.16.1's MoELayer as a peer baseline block (moe_infer.moe.baselines), loaded with the same exported
tensors as our own layer.

    block = MegatronBlock(cfg, router, experts, placement)     every rank of the EP group, together
    y_TD, stats = block(x_TD)                                   every rank, together, with its own T (possibly 0)

What megatron does in one MoELayer.forward (dropless, `alltoall` token dispatcher, SequentialMLP experts):
    router          logits = x @ W^T + b in fp32, top-k (pre_softmax: softmax over E then top-k, else top-k then
                    softmax over the k) -> probs [T, E] and a boolean routing map [T, E]
    dispatch        count the pairs per expert, all-gather those counts over the EP group (every rank learns every
                    rank's [E] counts), permute the rows by expert, variable-size all-to-all of the rows and of their
                    probabilities, then regroup the received rows by local expert (source-major -> expert-major)
    experts         each local expert on its contiguous slice: fc2(act(fc1(x)) * p) + fc2.bias * p
    combine         undo the regrouping, reverse all-to-all, un-permute and sum each token's k outputs

What we set, and why:
    expert_model_parallel_size = placement.ranks, TP = PP = 1: the EP group is the whole default world, as for our
        policies. megatron's parallel_state is global: it is initialized here when it is not, and a different EP size
        already in place is an error (one process cannot hold two).
    moe_expert_capacity_factor None (dropless), moe_token_dispatcher_type "alltoall", moe_grouped_gemm False: the
        SequentialMLP experts, the same as training uses (grouped GEMM needs the grouped_gemm CUDA kernels).
    moe_router_load_balancing_type "none", moe_aux_loss_coeff 0, moe_z_loss_coeff None: losses are meaningless at
        inference (megatron only computes them in training with grad anyway).
    moe_router_dtype "fp32", params fp32, every fusion off: the numerics our reference (moe_infer.model.moe) matches.
    add_bias_linear = the export's model.bias: in megatron one flag gives both the router and the experts their biases.
        An export with expert biases but no router bias gets a zero one (adding 0 is exact).
    perform_initialization False: every weight is overwritten from the export, and skipping init keeps megatron's
        RNG tracker (and torch's global RNG) out of it.
megatron puts local expert k of EP rank r at global id r * L + k: only the contiguous placement can be served, any
other raises PipelineError. The tensors are named by reading the export contract's megatron -> export
name map (moe_infer.export_format.MEGATRON_*) in reverse.

Shape legend: T tokens, D model dim, S sequence (megatron's [S, B, D] input), B batch (1 here), E experts,
R ranks, L experts per rank, N rows the local experts computed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_infer import export_format as fmt
from moe_infer.model.config import ModelConfig
from moe_infer.moe.experts import ExpertTensors, RouterTensors
from moe_infer.moe.stats import MoEStats, PhaseTimer
from moe_infer.placement import Placement
from pipeline.errors import PipelineError

# The dtype the block computes in; its input is cast to it and its output back to the input's dtype.
DTYPE = torch.float32
_COUNT_BYTES = 8  # megatron's per-expert token counts are int64


class MegatronBlock(nn.Module):
    """megatron's MoELayer for this rank's experts; `forward(x_TD) -> (y_TD, MoEStats)` (moe_infer.moe.baselines)."""

    def __init__(self, cfg: ModelConfig, router: RouterTensors, experts: ExpertTensors, placement: Placement):
        super().__init__()
        _check_contiguous(placement)
        self.placement, self.topk, self.hidden_size = placement, cfg.topk, cfg.hidden_size
        self.rank = _init_expert_parallel(placement.ranks)
        self.moe = _build_moe_layer(cfg, placement.ranks)
        _load(self.moe, cfg, router, experts, placement.local_experts(self.rank))
        self.moe.eval().requires_grad_(False)
        # The call in progress: the hooks below add to its stats (None outside a call).
        self._stats: MoEStats | None = None
        self._timer: PhaseTimer | None = None
        # Phase boundaries inside megatron's forward: router done = gate; experts start = dispatch (permutation,
        # count all-gather, all-to-alls, regrouping); experts done = experts; the rest (combine) ends in forward.
        self.moe.router.register_forward_hook(lambda *_: self._lap("gate"))
        self.moe.experts.register_forward_pre_hook(self._experts_start)
        self.moe.experts.register_forward_hook(lambda *_: self._lap("experts"))

    @torch.no_grad()
    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        num_tokens, hidden = x_TD.shape
        if hidden != self.hidden_size:
            raise PipelineError(f"megatron block: input has model dim {hidden}, the layer has {self.hidden_size}")
        stats = MoEStats(tokens=num_tokens, pairs_routed=num_tokens * self.topk)
        self._stats, self._timer = stats, PhaseTimer(stats, x_TD.device)
        x_use_TD = x_TD.to(DTYPE)
        if num_tokens == 0:
            # megatron cannot take 0 tokens: the router's gating linear (moe_utils.RouterGatingLinearFunction) ends
            # with `.view(*shape[:-1], -1)`, which is ambiguous for 0 elements and raises. An idle rank must still
            # take part in the count all-gather and both all-to-alls, so it routes one zero row whose output is
            # dropped. That row really is routed, sent and computed: it is counted in expert_rows and the bytes
            # (not in tokens / pairs_routed, which are what the caller brought).
            x_use_TD = x_TD.new_zeros(1, hidden, dtype=DTYPE)
        try:
            # megatron wants [S, B, D]: the tokens as one sequence of a batch of 1 (it flattens them again).
            y_SBD, mlp_bias = self.moe(x_use_TD.unsqueeze(1))
        finally:
            timer, self._stats, self._timer = self._timer, None, None
        if mlp_bias is not None:  # dropless SequentialMLP adds the expert biases itself and returns None
            raise PipelineError("megatron block: the MoELayer returned a separate bias, which this block does not add")
        y_TD = y_SBD.reshape(-1, hidden)[:num_tokens].to(x_TD.dtype)
        timer.lap("combine")
        return y_TD, stats

    def _lap(self, phase: str) -> None:
        if self._timer is not None:  # the MoELayer called directly, outside forward, records nothing
            self._timer.lap(phase)

    def _experts_start(self, module: nn.Module, args: tuple) -> None:
        """Between dispatch and the experts: the rows received, and the bytes megatron's dispatcher has exchanged."""
        if self._stats is None:
            return
        self._lap("dispatch")
        stats, (x_ND, _tokens_per_expert, probs_N) = self._stats, args
        stats.expert_rows = x_ND.shape[0]
        ranks = self.placement.ranks
        if ranks == 1:  # megatron skips every collective on one rank
            return
        dispatcher = self.moe.token_dispatcher
        # Rows this rank sends to each rank (input_splits) and receives from each (output_splits), in rank order;
        # the chunk it keeps for itself is not counted, as in MoEStats.
        sent = int(sum(dispatcher.input_splits)) - int(dispatcher.input_splits[self.rank])
        received = int(sum(dispatcher.output_splits)) - int(dispatcher.output_splits[self.rank])
        row_bytes = self.hidden_size * x_ND.element_size()
        # Dispatch moves each row and its probability, combine moves an output row back the other way.
        dispatch_bytes, combine_bytes = row_bytes + probs_N.element_size(), row_bytes
        # The counts: every rank's [E] int64 counts reach every other rank (all-gather).
        counts_bytes = (ranks - 1) * self.placement.num_experts * _COUNT_BYTES
        stats.bytes_sent = counts_bytes + sent * dispatch_bytes + received * combine_bytes
        stats.bytes_received = counts_bytes + received * dispatch_bytes + sent * combine_bytes


def _check_contiguous(placement: Placement) -> None:
    per_rank = placement.experts_per_rank
    for rank in range(placement.ranks):
        expected = list(range(rank * per_rank, (rank + 1) * per_rank))
        if placement.local_experts(rank) != expected:
            raise PipelineError(
                f"megatron block: rank {rank} holds experts {placement.local_experts(rank)}, but megatron's MoELayer "
                f"only places experts contiguously (rank r holds r*L .. r*L + L-1, here {expected}); "
                "use Placement.contiguous for the megatron baseline"
            )


def _init_expert_parallel(ranks: int) -> int:
    """megatron's parallel_state with EP = `ranks` over the whole default world; returns this rank's EP rank."""
    from pipeline.platform.megatron_cpu import patch_megatron_for_cpu

    if not dist.is_available() or not dist.is_initialized():
        raise PipelineError(
            "megatron block: torch.distributed is not initialized; megatron builds its expert-parallel groups from "
            "the default process group, so it is needed even on one rank"
        )
    world = dist.get_world_size()
    if world != ranks:
        raise PipelineError(
            f"megatron block: the placement spans {ranks} ranks but the default process group has {world}; "
            "the expert-parallel group must be the whole world"
        )
    patch_megatron_for_cpu()  # CPU substitutes for megatron's CUDA-only calls; does nothing with CUDA present
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ranks)
    elif parallel_state.get_expert_model_parallel_world_size() != ranks:
        raise PipelineError(
            "megatron block: megatron's model parallelism is already initialized in this process with "
            f"expert_model_parallel_size={parallel_state.get_expert_model_parallel_world_size()}, "
            f"but the placement spans {ranks} ranks (one process can hold only one)"
        )
    return parallel_state.get_expert_model_parallel_rank()


def _build_moe_layer(cfg: ModelConfig, ranks: int) -> nn.Module:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from pipeline.platform.megatron_config import transformer_config

    if cfg.activation not in ("gelu", "swiglu"):
        raise PipelineError(f"megatron block: activation {cfg.activation!r} is not one of gelu, swiglu")
    # Fusions off (the numerics of our reference), the activation, SequentialMLP experts, an fp32 router:
    # pipeline.platform.megatron_config.
    config = transformer_config(
        activation=cfg.activation,
        num_layers=1,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        moe_ffn_hidden_size=cfg.ffn_hidden_size,  # the experts are as wide as the dense FFN, as in training
        num_attention_heads=cfg.num_attention_heads,
        add_bias_linear=cfg.bias,
        params_dtype=DTYPE,
        perform_initialization=False,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_router_pre_softmax=cfg.router_pre_softmax,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ranks,
    )
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False).submodules.mlp
    moe = build_module(spec, config=config)
    moe.set_layer_number(1)  # only names the layer in megatron's (unused here) loss logging
    return moe


def _export_name(megatron_name: str) -> tuple[str, int | None, str]:
    """A MoELayer parameter name -> ("router", None, export key) or ("expert", local slot, export key), by running it
    through the export contract's megatron -> export name map (as "mlp.<name>", the MoELayer's place in a layer)."""
    full = f"mlp.{megatron_name}"
    if expert := fmt.MEGATRON_EXPERT.fullmatch(full):
        return "expert", int(expert["expert"]), f"{expert['fc']}.{expert['param']}"
    module, _, param = full.rpartition(".")
    if fmt.MEGATRON_LAYER_RENAMES.get(module) == "moe.router":
        return "router", None, param
    raise PipelineError(f"megatron block: megatron's MoELayer has a parameter {megatron_name} with no export name")


def _load(moe: nn.Module, cfg: ModelConfig, router: RouterTensors, experts: ExpertTensors, local: list[int]) -> None:
    """Copy the export's router and this rank's experts (global ids `local`, in local-slot order) into `moe`."""
    missing = [e for e in local if e not in experts]
    extra = sorted(set(experts) - set(local))
    if missing or extra:
        raise PipelineError(
            f"megatron block: this rank holds experts {local}, but was given tensors for {sorted(experts)}"
        )
    if cfg.bias and not cfg.router_bias and "bias" not in router:
        router = {**router, "bias": torch.zeros(cfg.num_experts)}  # see add_bias_linear in the module docstring
    # Every given tensor must find its megatron parameter: (kind, local slot, export key) not yet loaded.
    unused = {("router", None, key) for key in router} | {
        ("expert", slot, key) for slot, e in enumerate(local) for key in experts[e]
    }
    with torch.no_grad():
        for name, param_XY in moe.named_parameters():
            kind, slot, key = where = _export_name(name)
            source = router if kind == "router" else experts[local[slot]]
            label = "router" if kind == "router" else f"expert {local[slot]}"
            if key not in source:
                raise PipelineError(f"megatron block: {label} has no tensor {key} (for megatron's {name})")
            tensor_XY = source[key]
            if tuple(tensor_XY.shape) != tuple(param_XY.shape):
                raise PipelineError(
                    f"megatron block: {label} {key} has shape {list(tensor_XY.shape)}, megatron's {name} needs "
                    f"{list(param_XY.shape)}"
                )
            param_XY.copy_(tensor_XY.to(param_XY.dtype))
            unused.discard(where)
    if unused:
        kind, slot, key = sorted(unused, key=str)[0]
        label = "the router" if kind == "router" else f"expert {local[slot]}"
        raise PipelineError(f"megatron block: {label} has a tensor {key} that megatron's MoELayer has no place for")
