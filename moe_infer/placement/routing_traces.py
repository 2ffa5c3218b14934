"""The routing-trace file: which experts every traced token went to, per MoE layer and batch. Written by training
(pipeline.train.traces, from the routers' choices), read here by the placement and expert-cache studies
(moe_infer.placement.history): one format, one owner, imported by both sides.

Layout (`save_traces`, one .npz per rank and split, np.savez_compressed, no pickled objects):

    layer_names        str    [L]        module path of each MoE layer ("encoder.layers.1", "decoder.layers.3", ...);
                                         an MT model's encoder and decoder layers are separate entries
    layer{i}/experts   int16  [N_i, k]   the global expert ids each routed token of layer i went to, in top-k order
                                         (highest router probability first)
    layer{i}/batch     int32  [N_i]      index of the forward call (batch) the row came from, non-decreasing
    meta               str    []         JSON: format, version, num_experts, topk, task, split, config, step, ...

Rows of a batch are in megatron's token order: sequence-major ([S, B] flattened), padding dropped. Layer paths are
megatron's, whose layer index counts from 0 within a stack (moe_infer.placement.history renames them).

Shape legend: N traced tokens, k experts per token (top-k), L MoE layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError

TRACE_FORMAT, TRACE_VERSION = "moe-routing-traces", 1


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
