"""Which experts the routers pick: per-expert token counts (expert load) and, on request, per-token routing traces.

`RoutingRecorder(model)` puts a forward hook on every MoE router of a megatron model (GPT or T5) from construction
until `close()` (or the end of a `with` block). A router is replicated on every rank and scores this rank's tokens
over all E global experts, so its routing map already holds global expert ids; summing the counts over all ranks
gives the load of the whole batch. Padding tokens (MT) are left out when the forward passes
megatron's padding mask (pipeline.train.model does): they are routed, but they are not text.

The per-token traces are written in the routing-trace file format of moe_infer.placement.routing_traces (the
placement and cache studies read them there).

Shape legend: T tokens, E experts, k experts per token (top-k), N traced tokens, L MoE layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError


def moe_routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{MoE layer path: its router}, in module order (encoder before decoder, then by layer)."""
    from megatron.core.transformer.moe.router import Router

    return {
        name.removesuffix(".mlp.router"): module
        for name, module in model.named_modules()
        if isinstance(module, Router) and name.endswith(".mlp.router")
    }


class RoutingRecorder:
    """Counts (and optionally records) the experts every MoE router of `model` picks, forward after forward."""

    def __init__(self, model: torch.nn.Module, record_tokens: bool = False):
        routers = moe_routers(model)
        self.layer_names: list[str] = list(routers)
        self.record_tokens = record_tokens
        self._num_experts = {name: router.config.num_moe_experts for name, router in routers.items()}
        self._counts_E: dict[str, torch.Tensor | None] = {}
        self._traces: dict[str, list[torch.Tensor]] = {}
        self._handles = [
            router.register_forward_hook(self._hook(name), with_kwargs=True) for name, router in routers.items()
        ]
        self.reset()

    def _hook(self, layer: str):
        def record(router, args, kwargs, output):
            probs_TE, routing_map_TE = output
            # Router.forward(input, padding_mask): MoELayer passes the mask positionally, [S, B], True at padding.
            padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            with torch.no_grad():
                if padding is not None:
                    keep_T = ~padding.reshape(-1).to(routing_map_TE.device)
                    probs_TE, routing_map_TE = probs_TE[keep_T], routing_map_TE[keep_T]
                counts_E = routing_map_TE.sum(dim=0, dtype=torch.int64)
                previous = self._counts_E[layer]
                self._counts_E[layer] = counts_E if previous is None else previous + counts_E
                if self.record_tokens:
                    # The k picked experts of each token, ordered by their router probability.
                    scores_TE = probs_TE.float().masked_fill(~routing_map_TE, float("-inf"))
                    experts_Tk = scores_TE.topk(router.topk, dim=-1).indices.to(torch.int16)
                    self._traces[layer].append(experts_Tk.cpu())

        return record

    def counts(self, reduce: bool = True) -> dict[str, torch.Tensor]:
        """Per layer, int64 [E] tokens routed to each global expert since the last reset (each token counts k times).

        `reduce` sums over all ranks (a collective: every rank calls it); False gives this rank's own.
        """
        out = {}
        for layer in self.layer_names:
            counts_E = self._counts_E[layer]
            if counts_E is None:
                counts_E = torch.zeros(self._num_experts[layer], dtype=torch.int64)
            out[layer] = counts_E
        if reduce and dist.is_initialized() and out:
            # Over every rank (PP = CP = 1): DP replicas route their own batches, and under TP the ranks of a replica
            # route disjoint slices of its sequences (sequence parallelism).
            stacked_LE = torch.stack([out[layer] for layer in self.layer_names]).to(_collective_device())
            dist.all_reduce(stacked_LE)
            out = dict(zip(self.layer_names, stacked_LE.cpu(), strict=True))
        return {layer: counts_E.cpu() for layer, counts_E in out.items()}

    def fractions(self, reduce: bool = True) -> dict[str, list[float]]:
        """Per layer, each expert's share of the routed tokens (sums to 1; all zeros before any token)."""
        return {
            layer: (counts_E.double() / max(1, int(counts_E.sum()))).tolist()
            for layer, counts_E in self.counts(reduce).items()
        }

    def traces(self) -> dict[str, list[torch.Tensor]]:
        """Per layer, per forward call since the last reset, int16 [T, k] expert ids of this rank's tokens."""
        if not self.record_tokens:
            raise PipelineError("RoutingRecorder(record_tokens=False) keeps no per-token traces")
        return {layer: list(calls) for layer, calls in self._traces.items()}

    def reset(self) -> None:
        self._counts_E = {layer: None for layer in self.layer_names}
        self._traces = {layer: [] for layer in self.layer_names}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
