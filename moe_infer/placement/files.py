"""Placement files: the experts each rank holds, per MoE layer, as fitted offline and read by the engine.

    write_placement_file("placement.json", {"decoder.layers.1": [[6, 1, 7, 4], [2, 3, 5, 0]]}, num_experts=8,
                         algorithm="greedy", source="runs/lm-tiny/traces/valid-step000300.npz")
    pfile = read_placement_file("placement.json", num_experts=8, layer_names=[...], ranks=2)   checked
    placement_for_layer(pfile, "decoder.layers.1") -> Placement          (files without replicas)
    placements_for_export(pfile, layer_names) -> {layer: Placement or ReplicatedPlacement}   what the engine serves
    describe_placement_file(path) -> "a placement file (greedy, 2 ranks)" or None     what `fit --force` may replace

Layout (JSON):

    {"format": "moe-placement", "version": 1, "num_experts": 8, "ranks": 2,
     "layers": {"decoder.layers.1": [[experts of rank 0 in slot order], [experts of rank 1], ...], ...},
     "algorithm": "greedy", "source": "<trace file>"}

Every expert is placed at least once per layer, never twice on one rank. Without replicas (every expert exactly
once) every rank holds the same number of experts, as the dispatchers require; with replicas the ranks may hold
different numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moe_infer.placement.map import Placement, PlacementError
from moe_infer.placement.replicas import ReplicatedPlacement
from pipeline.atomic import write_atomic

PLACEMENT_FORMAT, PLACEMENT_VERSION = "moe-placement", 1
_MAX_PLACEMENT_BYTES = 64 << 20  # far beyond any real one (a few KB per layer): a larger file is not read to be sure


@dataclass(frozen=True)
class PlacementFile:
    num_experts: int
    ranks: int
    layers: dict[str, list[list[int]]]  # layer name -> rank -> its global experts in slot order
    algorithm: str = ""
    source: str = ""
    path: str = ""  # where it was read from, for messages

    def has_replicas(self, layer: str) -> bool:
        return sum(len(rank) for rank in self.layers[layer]) > self.num_experts


def write_placement_file(
    path: str | Path, layers: dict[str, list[list[int]]], num_experts: int, algorithm: str = "", source: str = ""
) -> Path:
    """Check `layers` as `read_placement_file` would, then write them atomically."""
    ranks = {len(placement) for placement in layers.values()}
    if len(ranks) != 1:
        raise PlacementError(f"{path}: layers are placed over different numbers of ranks {sorted(ranks)}")
    doc = {
        "format": PLACEMENT_FORMAT,
        "version": PLACEMENT_VERSION,
        "num_experts": num_experts,
        "ranks": ranks.pop(),
        "layers": {layer: [[int(e) for e in rank] for rank in placement] for layer, placement in layers.items()},
        "algorithm": algorithm,
        "source": source,
    }
    _check(doc, str(path))
    return write_atomic(path, json.dumps(doc, indent=1) + "\n")


def read_placement_file(
    path: str | Path,
    num_experts: int | None = None,
    layer_names: Iterable[str] | None = None,
    ranks: int | None = None,
) -> PlacementFile:
    """The checked contents of a placement file; num_experts, layer_names and ranks, when given, must match (the
    model and world it is about to be used with)."""
    where = str(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise PlacementError(f"{where}: cannot read the placement file ({err.strerror or err})") from None
    except ValueError as err:
        raise PlacementError(f"{where}: not a placement file: not JSON ({err})") from None
    pfile = _check(doc, where)
    if num_experts is not None and pfile.num_experts != num_experts:
        raise PlacementError(f"{where}: placement for {pfile.num_experts} experts, but the model has {num_experts}")
    if ranks is not None and pfile.ranks != ranks:
        raise PlacementError(f"{where}: placement for {pfile.ranks} ranks, but there are {ranks}")
    if layer_names is not None:
        expected = list(layer_names)
        unknown = [layer for layer in pfile.layers if layer not in expected]
        missing = [layer for layer in expected if layer not in pfile.layers]
        if unknown:
            raise PlacementError(f"{where}: unknown layer(s) {unknown}; the model's MoE layers are {expected}")
        if missing:
            raise PlacementError(f"{where}: no placement for layer(s) {missing}")
    return pfile


def describe_placement_file(path: Path) -> str | None:
    """What a placement file at `path` is, in words, when its JSON carries the placement format tag; None for anything
    else (pipeline.outputs.check_output: `fit --out` replaces only a placement file)."""
    if not path.is_file() or path.stat().st_size > _MAX_PLACEMENT_BYTES:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(doc, dict) or doc.get("format") != PLACEMENT_FORMAT:
        return None
    return f"a placement file ({doc.get('algorithm') or 'no algorithm named'}, {doc.get('ranks')} ranks)"


def placement_for_layer(pfile: PlacementFile, layer: str) -> Placement:
    """The engine's Placement for one layer of a file without replicas."""
    if layer not in pfile.layers:
        raise PlacementError(f"{pfile.path}: no placement for layer {layer!r} (it has {list(pfile.layers)})")
    if pfile.has_replicas(layer):
        raise PlacementError(
            f"{pfile.path}: layer {layer} replicates experts; a Placement holds each expert exactly once"
        )
    return Placement.from_rank_lists(pfile.layers[layer], pfile.num_experts)


def placements_for_export(
    pfile: PlacementFile, layer_names: Iterable[str]
) -> dict[str, Placement | ReplicatedPlacement]:
    """What the engine serves: each MoE layer's Placement, or ReplicatedPlacement where the file adds copies."""
    placements = {}
    for layer in layer_names:
        if layer not in pfile.layers:
            raise PlacementError(f"{pfile.path}: no placement for layer {layer!r} (it has {list(pfile.layers)})")
        ranks = pfile.layers[layer]
        if pfile.has_replicas(layer):
            placements[layer] = ReplicatedPlacement.from_rank_lists(ranks, pfile.num_experts)
        else:
            placements[layer] = Placement.from_rank_lists(ranks, pfile.num_experts)
    return placements


def _check(doc, where: str) -> PlacementFile:
    def bad(problem: str) -> PlacementError:
        return PlacementError(f"{where}: {problem}")

    if not isinstance(doc, dict) or doc.get("format") != PLACEMENT_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise bad(f"not a placement file: format {found!r}, expected {PLACEMENT_FORMAT!r}")
    if doc.get("version") != PLACEMENT_VERSION:
        raise bad(f"placement file version {doc.get('version')!r}, this code reads version {PLACEMENT_VERSION}")
    num_experts, ranks, layers = doc.get("num_experts"), doc.get("ranks"), doc.get("layers")
    if not _positive_int(num_experts):
        raise bad(f"num_experts must be a positive integer, got {num_experts!r}")
    if not _positive_int(ranks):
        raise bad(f"ranks must be a positive integer, got {ranks!r}")
    if not isinstance(layers, dict) or not layers:
        raise bad("'layers' must map each MoE layer name to its per-rank expert lists")
    for layer, placement in layers.items():
        _check_layer(layer, placement, num_experts, ranks, bad)
    return PlacementFile(
        num_experts=num_experts,
        ranks=ranks,
        layers={layer: [list(rank) for rank in placement] for layer, placement in layers.items()},
        algorithm=str(doc.get("algorithm", "")),
        source=str(doc.get("source", "")),
        path=where,
    )


def _check_layer(layer: str, placement, num_experts: int, ranks: int, bad) -> None:
    if not isinstance(placement, list) or not all(isinstance(rank, list) for rank in placement):
        raise bad(f"layer {layer}: expected a list of per-rank expert lists")
    if len(placement) != ranks:
        raise bad(f"layer {layer}: placed over {len(placement)} ranks, the file says {ranks}")
    for rank, experts in enumerate(placement):
        for expert in experts:
            if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < num_experts:
                raise bad(f"layer {layer}: rank {rank} lists expert {expert!r}, outside 0..{num_experts - 1}")
        twice = sorted({e for e in experts if experts.count(e) > 1})
        if twice:
            raise bad(f"layer {layer}: rank {rank} holds expert(s) {twice} more than once")
    placed = {e for experts in placement for e in experts}
    missing = sorted(set(range(num_experts)) - placed)
    if missing:
        raise bad(f"layer {layer}: expert(s) {missing} are not placed on any rank")
    sizes = [len(experts) for experts in placement]
    replicated = sum(sizes) > num_experts
    if not replicated and len(set(sizes)) != 1:
        raise bad(
            f"layer {layer}: ranks hold {sizes} experts; without replicas every rank must hold the same number "
            f"({num_experts} / {ranks})"
        )


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
