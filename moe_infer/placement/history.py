"""Per-batch expert load history of every MoE layer: the input of the placement algorithms.

    history = LoadHistory.from_routing_traces("runs/lm-tiny/traces/valid-step000300.npz")
    history.counts_BE["decoder.layers.1"]       int64 [B, E]: tokens routed to each expert in each batch
    fit, held_out = history.split_halves()      the paper's protocol: fit on the first half, evaluate on the second
    history.save("load.npz"); LoadHistory.load("load.npz")
    describe_load_history("load.npz")           "a load history of 2 MoE layers (...)", or None for any other file

A token routed top-k counts once for each of its k experts, so a batch row sums to k * tokens. Batches in which no
layer saw a token (the stand-in batches that keep data-parallel ranks in step) carry no traffic and are dropped.

File layout (`save`, np.savez_compressed, no pickled objects):

    meta         str    []       JSON: format, version, num_experts, layer_names, source
    layer{i}     int64  [B, E]   counts of layer_names[i]

Shape legend: B batches, E experts, N traced tokens, k experts per token (top-k).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_infer.placement.map import PlacementError
from moe_infer.placement.routing_traces import load_traces
from pipeline.atomic import atomic_path

HISTORY_FORMAT, HISTORY_VERSION = "moe-load-history", 1


def export_layer_name(megatron_path: str) -> str:
    """Training traces name a layer by its megatron module path, whose layer index counts from 0 within the stack
    ("decoder.layers.1"); the export, the engine and placement files count from 1 ("decoder.layers.2")."""
    stack, sep, index = megatron_path.rpartition(".layers.")
    if not sep or not index.isdigit():
        raise PlacementError(f"routing trace: {megatron_path!r} is not a megatron MoE layer path (<stack>.layers.<i>)")
    return f"{stack}.layers.{int(index) + 1}"


@dataclass(frozen=True)
class LoadHistory:
    counts_BE: dict[str, np.ndarray]  # per MoE layer (module path), int64 [B, E], in layer order
    num_experts: int
    source: str = ""  # where the counts came from (a trace file), for the record

    def __post_init__(self):
        if not self.counts_BE:
            raise PlacementError(f"load history ({self.source or 'no source'}): no MoE layers")
        for layer, counts_BE in self.counts_BE.items():
            if counts_BE.ndim != 2 or counts_BE.shape[1] != self.num_experts:
                raise PlacementError(
                    f"load history: layer {layer} counts have shape {counts_BE.shape}, expected [B, {self.num_experts}]"
                )

    @property
    def layer_names(self) -> list[str]:
        return list(self.counts_BE)

    @property
    def num_batches(self) -> int:
        """The fewest batches any layer has. Layers may differ: served MT models call encoder layers once per batch
        and decoder layers once per decoding step."""
        return min(counts_BE.shape[0] for counts_BE in self.counts_BE.values())

    def mean_load(self, layer: str) -> np.ndarray:
        """float64 [E]: the layer's mean tokens per batch for each expert."""
        return self.counts_BE[layer].mean(axis=0)

    @classmethod
    def read(cls, path: str | Path) -> LoadHistory:
        """Either kind of file: a load history (the engine's --record-trace, or `save`) or a training routing trace."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
        except (OSError, ValueError) as err:
            raise PlacementError(f"{path}: not a readable .npz file ({err})") from None
        return cls.load(path) if meta.get("format") == HISTORY_FORMAT else cls.from_routing_traces(path)

    @classmethod
    def from_routing_traces(cls, path: str | Path) -> LoadHistory:
        """Counts from a training routing-trace file (moe_infer.placement.routing_traces)."""
        layers, meta = load_traces(Path(path))
        num_experts = meta.get("num_experts")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise PlacementError(f"{path}: trace meta has no positive integer num_experts ({num_experts!r})")
        num_batches = 1 + max((int(t["batch"].max()) for t in layers.values() if t["batch"].size), default=-1)
        counts_BE = {
            export_layer_name(name): _count(t["experts"], t["batch"], num_batches, num_experts)
            for name, t in layers.items()
        }
        return cls(_drop_empty_batches(counts_BE), num_experts, source=str(path))

    def split_halves(self) -> tuple[LoadHistory, LoadHistory]:
        """(first half of each layer's batches, second half): fit on one, evaluate on data the fit never saw."""
        if self.num_batches < 2:
            raise PlacementError(f"load history ({self.source}): {self.num_batches} batch(es), need 2 to split")
        first = {layer: counts_BE[: len(counts_BE) // 2] for layer, counts_BE in self.counts_BE.items()}
        second = {layer: counts_BE[len(counts_BE) // 2 :] for layer, counts_BE in self.counts_BE.items()}
        return (
            LoadHistory(first, self.num_experts, f"{self.source} [first half]"),
            LoadHistory(second, self.num_experts, f"{self.source} [second half]"),
        )

    def save(self, path: str | Path) -> Path:
        meta = {
            "format": HISTORY_FORMAT,
            "version": HISTORY_VERSION,
            "num_experts": self.num_experts,
            "layer_names": self.layer_names,
            "source": self.source,
        }
        arrays = {"meta": np.array(json.dumps(meta))}
        arrays |= {f"layer{i}": counts_BE.astype(np.int64) for i, counts_BE in enumerate(self.counts_BE.values())}
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LoadHistory:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            meta = json.loads(str(arrays["meta"]))
        except (OSError, ValueError, KeyError) as err:
            raise PlacementError(f"{path}: not a load-history file ({type(err).__name__}: {err})") from None
        if meta.get("format") != HISTORY_FORMAT or meta.get("version") != HISTORY_VERSION:
            raise PlacementError(
                f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                f"expected {HISTORY_FORMAT!r} v{HISTORY_VERSION}"
            )
        names = meta["layer_names"]
        missing = [f"layer{i}" for i in range(len(names)) if f"layer{i}" not in arrays]
        if missing:
            raise PlacementError(f"{path}: arrays {missing} missing for {len(names)} layers")
        counts_BE = {name: arrays[f"layer{i}"].astype(np.int64) for i, name in enumerate(names)}
        return cls(counts_BE, int(meta["num_experts"]), source=meta.get("source", str(path)))


def describe_load_history(path: Path) -> str | None:
    """What a load history at `path` is, in words, when it is a file `LoadHistory.save` wrote (its metadata carries
    the format tag); None for anything else (pipeline.outputs.check_output: --record-trace replaces only one)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:  # only the small metadata array is read
            meta = json.loads(str(npz["meta"]))
    except Exception:  # not an .npz, a damaged one, no metadata: not ours, whatever numpy or zipfile raised
        return None
    if not isinstance(meta, dict) or meta.get("format") != HISTORY_FORMAT:
        return None
    layers = meta.get("layer_names") or []
    return f"a load history of {len(layers)} MoE layer(s) ({meta.get('source') or 'no source recorded'})"


def _count(experts_Nk: np.ndarray, batch_N: np.ndarray, num_batches: int, num_experts: int) -> np.ndarray:
    """int64 [B, E]: how many of the N tokens' k picks went to each expert, per batch."""
    flat = (batch_N.astype(np.int64)[:, None] * num_experts + experts_Nk.astype(np.int64)).reshape(-1)
    return np.bincount(flat, minlength=num_batches * num_experts).reshape(num_batches, num_experts)


def _drop_empty_batches(counts_BE: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    any_traffic_B = np.any([counts_BE.sum(axis=1) > 0 for counts_BE in counts_BE.values()], axis=0)
    return {layer: layer_BE[any_traffic_B] for layer, layer_BE in counts_BE.items()}
