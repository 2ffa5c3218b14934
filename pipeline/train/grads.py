"""Which rank reads which batch, and which gradients are summed over which process group (PP = CP = 1).

With W ranks, TP degree T and EP degree P (layout: pipeline.train.parallel_config), the dense weights are split T ways
and every TP group of T ranks is one data-parallel (DP) replica of them (DP = W/T); each DP replica reads its own
slice of every global batch, and each rank holds E/P whole experts. Each replica's loss is its token-summed
cross-entropy divided by the token count of the whole global batch, so the sum over replicas is the global mean (the T
ranks of a replica compute the same loss: the logits are gathered over TP).
- with T > 1, the weights megatron leaves whole on every TP rank but feeds with 1/T of each sequence (sequence
  parallelism: norms, q/k norms, the router, row-parallel biases; marked `sequence_parallel`) are first summed over
  the TP group, as megatron's finalize_model_grads does; the TP-split weights already hold their slice's gradient;
- dense grads are then summed over the DP group (every replica has them, each from its own tokens);
- expert grads already hold every token of the EP group that was routed to them (the all-to-all's backward brings them
  home), and are summed over the expert-data-parallel group (the ranks holding the same experts: W/P of them).
The router's load-balancing loss is computed per rank on its own tokens; its gradient is scaled by 1/DP
(scale_aux_loss_grads) so that the summed gradient is the mean over replicas, as the coefficient means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.train.model import is_expert_param


@dataclass
class Groups:
    tp: dist.ProcessGroup
    tp_size: int
    dp: dist.ProcessGroup
    dp_size: int
    dp_rank: int
    expert_dp: dist.ProcessGroup
    expert_dp_size: int
    ep: dist.ProcessGroup


def parallel_groups() -> Groups:
    """megatron's groups for this rank (after pipeline.train.model.init_model_parallel)."""
    from megatron.core import parallel_state as ps

    return Groups(
        tp=ps.get_tensor_model_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        dp=ps.get_data_parallel_group(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        expert_dp=ps.get_expert_data_parallel_group(),
        expert_dp_size=ps.get_expert_data_parallel_world_size(),
        ep=ps.get_expert_model_parallel_group(),
    )


def scale_aux_loss_grads(groups: Groups) -> None:
    """Scale the MoE aux losses' gradients by 1/DP (module docstring); megatron keeps the scale in a global."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / groups.dp_size))


@dataclass
class ParamSets:
    dense: list[torch.nn.Parameter]  # everything but the experts (TP-split or whole)
    experts: list[torch.nn.Parameter]
    sequence_parallel: list[torch.nn.Parameter]  # the dense ones whose grads are partial sums over the TP group

    @classmethod
    def of(cls, model: torch.nn.Module) -> ParamSets:
        dense = [p for p in model.parameters() if not is_expert_param(p)]
        return cls(
            dense=dense,
            experts=[p for p in model.parameters() if is_expert_param(p)],
            sequence_parallel=[p for p in dense if getattr(p, "sequence_parallel", False)],
        )


def _all_reduce_grads(params: list[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """One coalesced all-reduce (SUM) of the grads of `params` over `group`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


def _is_tp_split(param: torch.nn.Parameter) -> bool:
    """A dense weight of which each TP rank holds a slice (megatron's column/row-parallel layers, vocab embedding)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def _clip_grads(params: ParamSets, max_norm: float, groups: Groups) -> float:
    """Global grad norm: whole dense grads once (the same on every rank after sync), TP-split dense grads summed over
    the TP group, expert grads summed over the EP group; all grads scaled down when it exceeds `max_norm`."""

    def sq(tensors):
        return sum((p.grad.float().norm() ** 2 for p in tensors if p.grad is not None), torch.zeros(()))

    device = params.dense[0].device
    expert_sq = sq(params.experts).to(device)
    dist.all_reduce(expert_sq, group=groups.ep)
    split_sq = sq([p for p in params.dense if _is_tp_split(p)]).to(device)
    if groups.tp_size > 1:
        dist.all_reduce(split_sq, group=groups.tp)
    whole_sq = sq([p for p in params.dense if not _is_tp_split(p)]).to(device)
    norm = (whole_sq + split_sq + expert_sq).sqrt().item()
    if norm > max_norm:
        for p in params.dense + params.experts:
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def sync_and_clip_grads(params: ParamSets, max_norm: float, groups: Groups) -> float:
    """Collective, after backward: sum every grad over the ranks that share its weight (module docstring), then clip
    to `max_norm`. Returns the global grad norm before clipping (the same on every rank)."""
    if groups.tp_size > 1:
        _all_reduce_grads(params.sequence_parallel, groups.tp)
    _all_reduce_grads(params.dense, groups.dp)
    if groups.expert_dp_size > 1:
        _all_reduce_grads(params.experts, groups.expert_dp)
    return _clip_grads(params, max_norm, groups)
