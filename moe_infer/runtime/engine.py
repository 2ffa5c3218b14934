"""An export loaded for serving on this rank: dense layers replicated, experts sharded by a placement map, every MoE
layer served by the chosen implementation (moe_infer.moe.layer), the model wrapped by DeepSpeed's inference engine.

    engine = Engine.start("exports/lm-tiny", EngineOptions(policy="dynamic"))   joins the launcher's job (or none)
    outputs = engine.serve(requests, GenerationSettings(...))    every request's output ids, in order, on every rank
                                                                 (TranslationSettings: the sources translated)
    engine.model                     the plain-torch model (DecoderLM / EncoderDecoder) with served MoE layers
    engine.sync                      LockStep over the group: idle ranks keep calling the model with empty batches
    mine = engine.share(requests)    this rank's requests (every rank reads them all, serves every R-th one)
    results = engine.gather(mine_results, len(requests))     everyone's results in request order, on every rank

The expert-parallel group is the whole world: R ranks, E/R experts of each MoE layer on each. Each rank opens only the
expert files its placement assigns it (moe_infer.model.loader reads nothing else).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_infer.buffering.store import BufferedExperts
from moe_infer.model.loader import Export, load_model, read_expert
from moe_infer.model.moe import MoELayer
from moe_infer.model.transformer import DecoderLM, EncoderDecoder
from moe_infer.moe.layer import POLICIES, MoEOptions, ServedMoE, build_moe_layer, share_token_counts
from moe_infer.placement import Placement
from moe_infer.placement.online import RebalanceOptions
from moe_infer.placement.replicas import ReplicatedPlacement
from moe_infer.runtime.generate import GenerationSettings, generate
from moe_infer.runtime.lockstep import LockStep
from moe_infer.runtime.translate import TranslationSettings, translate
from pipeline.errors import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EngineError(PipelineError):
    """The engine cannot serve this export as asked (EP degree, policy, dtype)."""


@dataclass(frozen=True)
class EngineOptions:
    policy: str = "dynamic"
    moe: MoEOptions = field(default_factory=MoEOptions)
    # Expert buffering (dynamic and static; moe_infer.buffering.store): device slots per MoE layer, and which expert
    # leaves a full set of them (ENGINE_EVICTIONS). None, or at least the rank's local experts: every expert resident.
    expert_slots: int | None = None
    eviction: str = "paper"
    dtype: str = "float32"
    # One map for every MoE layer, or one per layer by name ("decoder.layers.2"); None: contiguous (rank r holds
    # experts r*E/R ... (r+1)*E/R - 1), which is also what the deepspeed and megatron baselines require.
    placement: Placement | dict[str, Placement | ReplicatedPlacement] | None = None
    timeout_s: float = 300.0  # bounds every collective: a rank that fails makes the others fail, never hang
    deepspeed_inference: bool = True  # wrap with deepspeed.init_inference
    # Online re-balancing (moe_infer.runtime.rebalance): the engine then keeps a host copy of its local experts in
    # the export's layout, which is what moves between ranks.
    rebalance: RebalanceOptions | None = None


@dataclass
class Engine:
    export: Export
    model: DecoderLM | EncoderDecoder
    placements: dict[str, Placement]  # MoE layer name -> where its experts live
    options: EngineOptions
    rank: int
    world_size: int
    device: torch.device
    sync: LockStep
    ds_engine: Any = None
    # With options.rebalance: MoE layer name -> this rank's experts by global id, each as the export's tensors in host
    # memory (moe_infer.runtime.rebalance moves them and rebuilds the layer's store from them).
    host_experts: dict[str, dict[int, dict[str, torch.Tensor]]] | None = None

    @classmethod
    def start(cls, export_dir: str | Path, options: EngineOptions = EngineOptions()) -> Engine:
        from pipeline.platform import detect_platform, init_distributed, set_threads_per_rank, tune_host_malloc

        if options.policy not in POLICIES:
            raise EngineError(f"unknown MoE policy {options.policy!r}; expected one of {', '.join(POLICIES)}")
        if options.dtype not in DTYPES:
            raise EngineError(f"unknown dtype {options.dtype!r}; expected one of {', '.join(DTYPES)}")
        if options.expert_slots is not None and options.policy not in ("dynamic", "static"):
            raise EngineError(f"expert buffering needs the dynamic or static policy, not {options.policy!r}")
        if options.rebalance is not None:
            options.rebalance.check()
            if options.policy not in ("dynamic", "static"):
                raise EngineError(f"online re-balancing needs the dynamic or static policy, not {options.policy!r}")
        platform = detect_platform()
        if "OMP_NUM_THREADS" not in os.environ:  # the user's (or torchrun's) thread count wins; else share the cores
            set_threads_per_rank()
        tune_host_malloc()
        info = init_distributed(platform, timeout_s=options.timeout_s, use_deepspeed=True)
        device = torch.device("cuda", torch.cuda.current_device()) if platform.cuda else torch.device("cpu")
        export = Export.open(export_dir)
        placements = expert_placements(export, info.world_size, options.placement)
        replicated = [name for name, p in placements.items() if isinstance(p, ReplicatedPlacement)]
        if replicated and options.rebalance is not None:
            raise EngineError(
                f"layers {replicated} have expert replicas, which online re-balancing does not move (one copy of "
                "each expert): serve the placement file without --rebalance-interval"
            )
        if replicated and options.policy != "dynamic":
            raise EngineError(
                f"layers {replicated} have expert replicas, which only the dynamic policy serves "
                f"(policy {options.policy!r} keeps one copy of each expert)"
            )
        host_experts = {} if options.rebalance is not None else None
        model = load_served_model(export, placements, info.rank, options, device, host_experts)
        engine = cls(export, model, placements, options, info.rank, info.world_size, device, LockStep(device=device))
        engine.host_experts = host_experts
        if options.deepspeed_inference:
            engine.ds_engine = _wrap_with_deepspeed(model, DTYPES[options.dtype])
        return engine

    @property
    def moe_layers(self) -> list[ServedMoE]:
        return [m for m in self.model.modules() if isinstance(m, ServedMoE)]

    def reset_stats(self) -> None:
        for layer in self.moe_layers:
            layer.reset_stats()

    def serve(self, requests: Sequence[list[int]], settings: GenerationSettings | TranslationSettings) -> list:
        """Every request's output ids in request order, on every rank (a collective: every rank calls it with all the
        requests). GenerationSettings: the prompts continued (moe_infer.runtime.generate); TranslationSettings: the
        sources translated (moe_infer.runtime.translate). Each rank serves its share in lock step with the others."""
        if isinstance(settings, GenerationSettings):
            ids = self.share(range(len(requests)))  # sampling is seeded per request id, whatever rank serves it
            mine = generate(self.model, self.share(requests), settings, self.sync, request_ids=ids)
        else:
            mine = translate(self.model, self.share(requests), settings, self.sync)
        return self.gather(mine, len(requests))

    def share(self, requests: Sequence[Any]) -> list[Any]:
        """This rank's requests: every R-th one from its rank on (all ranks see all requests, so validation errors
        are raised on every rank alike before any collective)."""
        return list(requests[self.rank :: self.world_size])

    def gather(self, results: list[Any], total: int) -> list[Any]:
        """Every rank's results (each in `share` order) back in request order, on every rank."""
        if self.world_size == 1:
            return list(results)
        per_rank: list[list[Any]] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(per_rank, results)
        ordered: list[Any] = [None] * total
        for rank, items in enumerate(per_rank):
            ordered[rank :: self.world_size] = items
        return ordered


def moe_layer_names(export: Export) -> list[str]:
    """The export's MoE layers by name, as the served model calls them ("encoder.layers.1", "decoder.layers.2")."""
    cfg = export.model_config
    return [f"{stack}.layers.{n}" for stack in ("encoder", "decoder") for n in cfg.moe_layers.get(stack, ())]


def expert_placements(
    export: Export, ranks: int, placement: Placement | dict[str, Placement | ReplicatedPlacement] | None
) -> dict[str, Placement]:
    """Every MoE layer's placement, checked against the export and the number of ranks."""
    num_experts = export.model_config.num_experts
    if num_experts % ranks and not isinstance(placement, dict):
        raise EngineError(
            f"{export.path}: the export has {num_experts} experts per MoE layer, which cannot be split evenly over "
            f"{ranks} ranks (the EP degree is the number of ranks: use one that divides {num_experts})"
        )
    names = moe_layer_names(export)
    if isinstance(placement, dict):
        unknown, missing = sorted(set(placement) - set(names)), [n for n in names if n not in placement]
        if unknown or missing:
            raise EngineError(
                f"the placement does not match {export.path}: layers {unknown} are not MoE layers of the export, "
                f"layers {missing} have no placement (expected exactly {names})"
            )
        per_layer = dict(placement)
    else:
        per_layer = dict.fromkeys(names, placement or Placement.contiguous(num_experts, ranks))
    for name, layer_placement in per_layer.items():
        if layer_placement.ranks != ranks or layer_placement.num_experts != num_experts:
            raise EngineError(
                f"the placement of {name} is for {layer_placement.num_experts} experts on {layer_placement.ranks} "
                f"ranks; this job has {num_experts} experts on {ranks} ranks"
            )
    return per_layer


def load_served_model(
    export: Export,
    placements: dict[str, Placement],
    rank: int,
    options: EngineOptions,
    device: torch.device,
    host_experts: dict | None = None,
) -> DecoderLM | EncoderDecoder:
    """The dense model (no experts loaded by the loader) with each MoE layer replaced by a served one holding this
    rank's experts, resident or buffered (options.expert_slots). Layers are built in the same order on every rank
    (DeepSpeed's first one creates its groups). `host_experts`, when given, gets each layer's local experts as the
    export's tensors in host memory (the stores keep their own stacked copies)."""
    dtype = DTYPES[options.dtype]
    model = load_model(export, experts=lambda stack, layer, expert: False, device=device, dtype=dtype)
    capacity_fraction = float(export.config["moe"]["capacity_fraction"])
    for stack, layer, moe in _moe_layers(model):
        placement = placements[moe.name]
        local = placement.local_experts(rank)
        experts = {
            e: {k: t.to(device=device, dtype=dtype) for k, t in read_expert(export, stack, layer, e).items()}
            for e in local
        }
        router = {k: t.detach().float() for k, t in moe.router.state_dict().items()}
        tensors_L = [experts[e] for e in local]
        if host_experts is not None:
            host_experts[moe.name] = {e: {k: t.to("cpu") for k, t in ts.items()} for e, ts in experts.items()}
        store = expert_store(export.model_config, tensors_L, options.expert_slots, options.eviction, device)
        getattr(model, stack).layers[str(layer)].moe = build_moe_layer(
            options.policy, moe.name, export.model_config, router, experts, placement, options.moe, capacity_fraction,
            store,
        )  # fmt: skip
    share_token_counts([m for m in model.modules() if isinstance(m, ServedMoE)])  # one agreement per forward pass
    return model.eval().requires_grad_(False)


def expert_store(
    cfg,
    tensors_L: list[dict[str, torch.Tensor]],
    slots: int | None,
    eviction: str,
    device: torch.device | str,
    initial: list[int] | None = None,
) -> BufferedExperts | None:
    """The buffered store of a layer's local experts when `slots` device slots are fewer than them (expert
    buffering; `initial`: the local experts resident at the start); None (the layer keeps every expert resident,
    moe_infer.moe.experts.LocalExperts) otherwise."""
    if slots is None or slots >= len(tensors_L):
        return None
    return BufferedExperts(cfg, tensors_L, slots, eviction, device, initial=initial)


def _moe_layers(model: DecoderLM | EncoderDecoder) -> list[tuple[str, int, MoELayer]]:
    found = []
    for stack in ("encoder", "decoder"):
        for number, layer in getattr(model, stack).layers.items() if hasattr(model, stack) else ():
            if isinstance(getattr(layer, "moe", None), MoELayer):
                found.append((stack, int(number), layer.moe))
    return found


def _wrap_with_deepspeed(model: torch.nn.Module, dtype: torch.dtype):
    """deepspeed.init_inference as a thin wrapper: no kernel injection (it has no CPU kernels and no policy for our
    modules), no tensor parallelism (dense layers are replicated). The engine keeps calling `model` itself, which
    the wrapper holds as `.module`: our models need encode/decode/new_cache, which the wrapper does not forward."""
    import deepspeed

    ds_engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False)
    if ds_engine.module is not model:
        raise EngineError("deepspeed.init_inference replaced the model; the engine needs the model it built")
    return ds_engine


__all__ = ["DTYPES", "Engine", "EngineError", "EngineOptions", "expert_placements", "moe_layer_names"]
