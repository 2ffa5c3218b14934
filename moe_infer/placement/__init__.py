"""Expert placement: which rank (and local slot) holds each expert of an MoE layer, and how to choose it.

    from moe_infer.placement import Placement, PlacementError      the map the engine serves with (map.py)

    history = LoadHistory.from_routing_traces(trace_npz)           history.py: per-batch expert loads [B, E]
    fit, held_out = history.split_halves()
    ranks_D = greedy(fit.mean_load(layer), ranks=2)                algorithms.py: contiguous, greedy,
                                                                   anti_correlation, replicate
    placement_metrics(held_out.counts_BE[layer], ranks_D)          metrics.py: max load, avg max load, balancedness
    write_placement_file(path, {layer: ranks_D}, num_experts=8)    files.py: JSON, checked on read
    placement_for_layer(read_placement_file(path), layer)          -> Placement (files without replicas)
    ReplicatedPlacement                                            replicas.py (engine side): serving with copies

    python -m moe_infer.placement fit --trace T.npz --ranks 2 --algorithm greedy --out placement.json
    python -m moe_infer.placement evaluate --trace T.npz --ranks 2,4,8 [--run-dir DIR]

Only `Placement` and `PlacementError` are imported eagerly: the engine needs nothing else, and the fitting code
pulls in numpy-heavy modules the serving path does not use.
"""

from moe_infer.placement.map import Placement, PlacementError

__all__ = ["Placement", "PlacementError"]
