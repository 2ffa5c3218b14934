"""Which experts the routers pick: per-expert token counts (expert load) and, on request, per-token routing traces.

`RoutingRecorder(model)` puts a forward hook on every MoE router of a megatron model (GPT or T5) from construction
until `close()` (or the end of a `with` block). A router is replicated on every rank and scores this rank's tokens
over all E global experts, so its routing map already holds global expert ids; summing the counts over the
data-parallel group gives the load of the whole batch. Padding tokens (MT) are left out when the forward passes
megatron's padding mask (pipeline.train.model does): they are routed, but they are not text.

Trace file layout (`save_traces`, one .npz per rank and split, np.savez_compressed, no pickled objects):

    layer_names        str    [L]        module path of each MoE layer ("encoder.layers.1", "decoder.layers.3", ...);
                                         an MT model's encoder and decoder layers are separate entries
    layer{i}/experts   int16  [N_i, k]   the global expert ids each routed token of layer i went to, in top-k order
                                         (highest router probability first)
    layer{i}/batch     int32  [N_i]      index of the forward call (batch) the row came from, non-decreasing
    meta               str    []         JSON: format, version, num_experts, topk, task, split, config, step, ...

Rows of a batch are in megatron's token order: sequence-major ([S, B] flattened), padding dropped.

Shape legend: T tokens, E experts, k experts per token (top-k), N traced tokens, L MoE layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError

TRACE_FORMAT, TRACE_VERSION = "moe-routing-traces", 1


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

        `reduce` sums over the data-parallel group (a collective: every rank calls it); False gives this rank's own.
        """
        out = {}
        for layer in self.layer_names:
            counts_E = self._counts_E[layer]
            if counts_E is None:
                counts_E = torch.zeros(self._num_experts[layer], dtype=torch.int64)
            out[layer] = counts_E
        if reduce and dist.is_initialized() and out:
            from megatron.core import parallel_state

            # Data-parallel = every rank here (TP = PP = 1); the world group when megatron's groups are not set up.
            group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
            stacked_LE = torch.stack([out[layer] for layer in self.layer_names]).to(_collective_device())
            dist.all_reduce(stacked_LE, group=group)
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


def save_traces(traces: dict[str, list[torch.Tensor]], path: Path, meta: dict) -> Path:
    """Write `traces` (RoutingRecorder.traces()) and `meta` to `path` in the layout of the module docstring, atomically.

    `meta` must be JSON-serialisable; it should name num_experts, topk, task, split, config and step.
    """
    path = Path(path)
    names = list(traces)
    widths = {t.shape[1] for calls in traces.values() for t in calls}
    topk = meta.get("topk", next(iter(widths)) if widths else 0)
    if widths - {topk}:
        raise PipelineError(f"traces for {path}: rows of {sorted(widths)} experts, expected topk={topk}")
    arrays: dict[str, np.ndarray] = {
        "layer_names": np.array(names, dtype=np.str_),
        "meta": np.array(json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION, **meta, "topk": topk})),
    }
    for i, layer in enumerate(names):
        calls = traces[layer]
        experts_Nk = np.concatenate([t.numpy() for t in calls]) if calls else np.zeros((0, topk))
        batch_N = np.concatenate([np.full(len(t), b) for b, t in enumerate(calls)]) if calls else np.zeros(0)
        arrays[f"layer{i}/experts"] = experts_Nk.astype(np.int16).reshape(-1, topk)
        arrays[f"layer{i}/batch"] = batch_N.astype(np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez_compressed(f, **arrays)
    return path


def load_traces(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """({layer name: {"experts": int16 [N, k], "batch": int32 [N]}}, meta) from a save_traces file, checked."""
    path = Path(path)

    def bad(reason: str) -> PipelineError:
        return PipelineError(f"{path}: not a valid routing-trace file: {reason}")

    if not path.is_file():
        raise PipelineError(f"{path}: no routing-trace file there")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise bad(f"cannot be read as .npz ({err})") from None
    for key in ("layer_names", "meta"):
        if key not in arrays:
            raise bad(f"missing '{key}'")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as err:
        raise bad(f"'meta' is not JSON ({err})") from None
    if meta.get("format") != TRACE_FORMAT or meta.get("version") != TRACE_VERSION:
        raise bad(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {TRACE_FORMAT!r} v1")
    names = [str(n) for n in arrays["layer_names"].reshape(-1)]
    if not isinstance(meta.get("topk"), int):
        raise bad(f"meta has no integer 'topk': {meta.get('topk')!r}")
    expected = {"layer_names", "meta"}
    expected |= {f"layer{i}/{part}" for i in range(len(names)) for part in ("experts", "batch")}
    if set(arrays) != expected:
        raise bad(f"arrays {sorted(set(arrays) ^ expected)} missing or unexpected for {len(names)} layers")
    layers = {}
    for i, name in enumerate(names):
        experts_Nk, batch_N = arrays[f"layer{i}/experts"], arrays[f"layer{i}/batch"]
        if experts_Nk.dtype != np.int16 or experts_Nk.ndim != 2 or experts_Nk.shape[1] != meta["topk"]:
            raise bad(f"layer{i}/experts is {experts_Nk.dtype} {experts_Nk.shape}, expected int16 [N, {meta['topk']}]")
        if batch_N.dtype != np.int32 or batch_N.shape != experts_Nk.shape[:1]:
            raise bad(f"layer{i}/batch is {batch_N.dtype} {batch_N.shape}, expected int32 [{len(experts_Nk)}]")
        if experts_Nk.size and not 0 <= experts_Nk.min() <= experts_Nk.max() < meta.get("num_experts", 2**15):
            raise bad(f"layer{i}/experts holds ids outside [0, num_experts={meta.get('num_experts')})")
        if batch_N.size and (batch_N[0] < 0 or (np.diff(batch_N) < 0).any()):
            raise bad(f"layer{i}/batch is not a non-decreasing batch index")
        layers[name] = {"experts": experts_Nk, "batch": batch_N}
    return layers, meta
