"""History-based expert placement: algorithms on hand-made loads, metrics, load histories and placement files."""

import itertools
import json

import numpy as np
import pytest
import torch

from moe_infer.placement import Placement, PlacementError
from moe_infer.placement.__main__ import main as placement_cli
from moe_infer.placement.algorithms import (
    anti_correlation,
    contiguous,
    eplb,
    greedy,
    pack_copies,
    pearson_corr,
    replica_counts,
    replicate,
)
from moe_infer.placement.files import placement_for_layer, read_placement_file, write_placement_file
from moe_infer.placement.history import LoadHistory
from moe_infer.placement.metrics import placement_metrics, rank_loads
from moe_infer.placement.routing_traces import load_traces, save_traces
from pipeline.errors import PipelineError


def _sums(load_E, placement):
    return [sum(load_E[e] for e in rank) for rank in placement]


# ---- algorithms -----------------------------------------------------------------------------------------------------


def test_contiguous_matches_the_engine_default():
    assert contiguous(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert contiguous(8, 2) == [Placement.contiguous(8, 2).local_experts(r) for r in range(2)]


def test_greedy_reaches_the_known_optimum():
    load_E = [8, 7, 6, 5, 4, 3, 2, 1]  # total 36: the optimum puts 18 on each rank
    placement = greedy(load_E, 2)
    assert _sums(load_E, placement) == [18, 18]
    assert sorted(len(rank) for rank in placement) == [4, 4]
    assert sorted(e for rank in placement for e in rank) == list(range(8))
    assert _sums(load_E, contiguous(8, 2)) == [26, 10]


def test_greedy_refuses_uneven_splits():
    with pytest.raises(PlacementError, match="cannot be split evenly"):
        greedy([1, 2, 3], 2)


# Expert 0 is hot and steady, 1 and 2 fire together (correlation 1), 3 is cold and uncorrelated with both.
TOGETHER_BE = np.array([[10, 4, 3, 1], [10, 8, 7, 2], [10, 4, 3, 2], [10, 8, 7, 1]])


def test_anti_correlation_spreads_experts_that_fire_together():
    corr_EE = pearson_corr(TOGETHER_BE)
    assert corr_EE[1, 2] == pytest.approx(1.0) and corr_EE[0, 1] == 0.0  # a constant column has correlation 0
    plain = greedy(TOGETHER_BE.mean(axis=0), 2)
    assert any({1, 2} <= set(rank) for rank in plain)  # greedy puts the pair together
    spread = anti_correlation(TOGETHER_BE, 2)
    assert not any({1, 2} <= set(rank) for rank in spread)
    assert spread == [[0, 2], [1, 3]]


def test_anti_correlation_without_weight_is_greedy():
    counts_BE = np.random.default_rng(0).integers(0, 50, size=(20, 8))
    assert anti_correlation(counts_BE, 4, weight=0.0) == greedy(counts_BE.mean(axis=0), 4)


def test_replication_splits_a_hot_experts_tokens_and_conserves_them():
    load_E = np.array([20.0, 1, 1, 1, 1, 1, 1, 1])  # expert 0 alone outweighs everything else
    base = greedy(load_E, 4)
    placement = replicate(load_E, base, extra_slots=2)
    copies = sum(rank.count(0) for rank in placement)
    assert copies == 3 and all(rank.count(0) <= 1 for rank in placement)
    counts_BE = np.random.default_rng(1).integers(0, 30, size=(6, 8))
    loads_BD = rank_loads(counts_BE, placement)
    np.testing.assert_allclose(loads_BD.sum(axis=1), counts_BE.sum(axis=1))  # no token lost or counted twice
    holders = [r for r, rank in enumerate(placement) if 0 in rank]
    only_0_BE = np.zeros((1, 8))
    only_0_BE[0, 0] = 9
    np.testing.assert_allclose(rank_loads(only_0_BE, placement)[0, holders], [3, 3, 3])
    assert max(_sums(load_E / [copies, *[1] * 7], placement)) < max(_sums(load_E, base))


def test_replication_never_makes_the_fitted_balance_worse():
    load_E = [8, 7, 6, 5, 4, 3, 2, 1]  # greedy is already perfect on 2 ranks: a copy could only unbalance it
    assert replicate(load_E, greedy(load_E, 2), extra_slots=1) == greedy(load_E, 2)


def test_eplb_spreads_a_dominant_expert_over_every_rank():
    load_E = np.array([20.0, 1, 1, 1, 1, 1, 1, 1])
    # Water-filling: 20 -> 10 -> 6.7 -> 5 per copy, then expert 0 is on all 4 ranks and the 4th slot goes to expert 1.
    np.testing.assert_array_equal(replica_counts(load_E, 4, 4), [4, 2, 1, 1, 1, 1, 1, 1])
    placement = eplb(load_E, 4, extra_slots=3)
    assert all(0 in rank for rank in placement)
    assert sorted(len(rank) for rank in placement) == [2, 3, 3, 3]  # 11 slots: 11 // 4 each, 11 % 4 ranks one more
    loads_D = [sum(load_E[e] / 4 if e == 0 else load_E[e] for e in rank) for rank in placement]
    assert sorted(loads_D) == [6, 7, 7, 7]  # greedy without copies cannot go below 20


def _best_max_load(load_E, copies_E, ranks):
    """Brute force: the smallest largest rank load over every packing of the copies (one per rank per expert, slot
    counts differing by at most one)."""
    per_copy_E = np.asarray(load_E, dtype=float) / copies_E
    best = np.inf
    for holders in itertools.product(*[itertools.combinations(range(ranks), c) for c in copies_E]):
        sizes_D, loads_D = np.zeros(ranks), np.zeros(ranks)
        for expert, held_by in enumerate(holders):
            sizes_D[list(held_by)] += 1
            loads_D[list(held_by)] += per_copy_E[expert]
        if sizes_D.max() - sizes_D.min() <= 1:
            best = min(best, loads_D.max())
    return best


@pytest.mark.parametrize("load_E, ranks, extra", [([9, 7, 6, 2, 2, 1], 3, 3), ([12, 5, 4, 4, 3, 2, 1, 1], 2, 2)])
def test_eplb_packing_reaches_the_brute_force_optimum(load_E, ranks, extra):
    copies_E = replica_counts(np.array(load_E, dtype=float), ranks, extra)
    placement = eplb(load_E, ranks, extra)
    per_copy_E = np.array(load_E) / copies_E
    assert max(sum(per_copy_E[e] for e in rank) for rank in placement) == pytest.approx(
        _best_max_load(load_E, copies_E, ranks)
    )


def test_eplb_placements_are_well_formed_and_conserve_tokens():
    rng = np.random.default_rng(2)
    for _ in range(60):
        ranks = int(rng.choice([2, 3, 4, 8]))
        num_experts = ranks * int(rng.integers(1, 4))
        extra = int(rng.integers(0, num_experts * (ranks - 1) + 1))
        load_E = rng.pareto(1.0, num_experts) * rng.integers(0, 2, num_experts)  # heavy tail, some experts idle
        placement = eplb(load_E, ranks, extra)
        sizes = [len(rank) for rank in placement]
        assert sum(sizes) == num_experts + extra and max(sizes) - min(sizes) <= 1
        assert all(len(set(rank)) == len(rank) for rank in placement)  # never two copies on one rank
        counts_BE = rng.integers(0, 30, size=(5, num_experts))
        np.testing.assert_allclose(rank_loads(counts_BE, placement).sum(axis=1), counts_BE.sum(axis=1))
        if extra == 0:
            assert placement == greedy(load_E, ranks)


def test_eplb_packing_never_strands_an_experts_copies():
    # Expert 1 (no load, so packed last) needs a slot on all 4 ranks; least-loaded-first would fill one rank before
    # it comes, so the packing has to fall back to the ranks with the most free slots.
    copies_E = np.array([2, 4, 1, 2, 1, 2])
    placement = pack_copies(np.array([4.0, 0, 1, 2, 4, 1]), copies_E, 4)
    assert all(1 in rank for rank in placement) and [len(rank) for rank in placement] == [3, 3, 3, 3]
    assert [sum(e in rank for rank in placement) for e in range(6)] == copies_E.tolist()


def test_eplb_refuses_impossible_slot_counts():
    with pytest.raises(PlacementError, match="at most one copy of an expert per rank"):
        eplb([1.0, 2.0], 2, extra_slots=3)
    with pytest.raises(PlacementError, match="expected 1 ... 2 copies"):
        pack_copies(np.array([1.0, 2.0]), np.array([3, 1]), 2)


# ---- metrics --------------------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_example():
    counts_BE = np.array([[3, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # the empty batch is skipped
    placement = [[0, 1], [2, 3]]
    np.testing.assert_allclose(rank_loads(counts_BE, placement), [[4, 0], [2, 2], [0, 0]])
    scores = placement_metrics(counts_BE, placement)
    assert scores["max_load"] == pytest.approx(1.0)
    assert scores["avg_max_load"] == pytest.approx((1.0 + 0.5) / 2)
    assert scores["balancedness"] == pytest.approx((2 / 4 + 2 / 2) / 2)
    assert scores["total_balancedness"] == pytest.approx(((6 + 2) / 2) / 6)  # ranks carry 6 and 2 in all


def test_metrics_refuse_an_expert_placed_nowhere():
    with pytest.raises(PlacementError, match=r"expert\(s\) \[3\] are not placed"):
        placement_metrics(np.ones((2, 4)), [[0, 1], [2]])


# ---- history --------------------------------------------------------------------------------------------------------


def _write_trace(path, num_experts=4):
    # Batch 0: tokens (0,1),(0,2); batch 1: a stand-in with no tokens; batch 2: (3,0); batch 3: (1,0),(1,2).
    calls = [[[0, 1], [0, 2]], [], [[3, 0]], [[1, 0], [1, 2]]]
    traces = {"decoder.layers.1": [torch.tensor(c, dtype=torch.int16).reshape(-1, 2) for c in calls]}
    return save_traces(traces, path, {"num_experts": num_experts, "topk": 2, "split": "valid"})


def test_history_from_traces_counts_every_top_k_pick(tmp_path):
    history = LoadHistory.from_routing_traces(_write_trace(tmp_path / "t.npz"))
    # The trace names megatron's module (layers counted from 0); the history uses the export's names (from 1).
    assert history.layer_names == ["decoder.layers.2"] and history.num_experts == 4
    np.testing.assert_array_equal(history.counts_BE["decoder.layers.2"], [[2, 1, 1, 0], [1, 0, 0, 1], [1, 2, 1, 0]])
    fit, held_out = history.split_halves()
    assert (fit.num_batches, held_out.num_batches) == (1, 2)
    history.save(tmp_path / "h.npz")
    again = LoadHistory.load(tmp_path / "h.npz")
    np.testing.assert_array_equal(again.counts_BE["decoder.layers.2"], history.counts_BE["decoder.layers.2"])
    assert again.source == history.source


# ---- files ----------------------------------------------------------------------------------------------------------


def test_placement_file_round_trip(tmp_path):
    layers = {"decoder.layers.1": [[3, 0], [1, 2]], "decoder.layers.3": [[0, 1, 2], [3, 0]]}
    path = write_placement_file(tmp_path / "p.json", layers, num_experts=4, algorithm="greedy", source="t.npz")
    pfile = read_placement_file(path, num_experts=4, layer_names=list(layers), ranks=2)
    assert pfile.layers == layers and (pfile.algorithm, pfile.source) == ("greedy", "t.npz")
    placement = placement_for_layer(pfile, "decoder.layers.1")
    assert [placement.local_experts(r) for r in range(2)] == [[3, 0], [1, 2]]
    with pytest.raises(PlacementError, match="replicates experts"):
        placement_for_layer(pfile, "decoder.layers.3")


GOOD = {"format": "moe-placement", "version": 1, "num_experts": 4, "ranks": 2, "layers": {"l1": [[0, 1], [2, 3]]}}


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        ({"format": "other"}, {}, "not a placement file: format 'other'"),
        ({"version": 2}, {}, "version 2"),
        ({"layers": {"l1": [[0, 1], [2]]}}, {}, r"expert\(s\) \[3\] are not placed"),
        ({"layers": {"l1": [[0, 1], [2, 9]]}}, {}, "expert 9, outside 0..3"),
        ({"layers": {"l1": [[0, 1, 2], [3]]}}, {}, r"ranks hold \[3, 1\] experts"),
        ({"layers": {"l1": [[0, 0, 1], [2, 3]]}}, {}, "more than once"),
        ({"layers": {"l1": [[0, 1, 2, 3]]}}, {}, "placed over 1 ranks, the file says 2"),
        ({}, {"layer_names": ["l1", "l2"]}, r"no placement for layer\(s\) \['l2'\]"),
        ({}, {"layer_names": ["l0"]}, r"unknown layer\(s\) \['l1'\]"),
        ({}, {"num_experts": 8}, "placement for 4 experts, but the model has 8"),
        ({}, {"ranks": 4}, "placement for 2 ranks, but there are 4"),
    ],
)
def test_placement_file_errors_name_the_file_and_the_problem(tmp_path, change, kwargs, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(PlacementError, match=message) as err:
        read_placement_file(path, **kwargs)
    assert str(path) in str(err.value)


# ---- command line ---------------------------------------------------------------------------------------------------


def test_cli_fits_and_evaluates(tmp_path, capsys):
    trace = _write_trace(tmp_path / "t.npz", num_experts=4)
    out = tmp_path / "p.json"
    fit = ["fit", "--trace", str(trace), "--ranks", "2", "--algorithm", "greedy", "--out", str(out)]
    assert placement_cli(fit) == 0
    pfile = read_placement_file(out, num_experts=4, layer_names=["decoder.layers.2"], ranks=2)
    assert pfile.algorithm == "greedy"
    assert placement_cli([*fit[:-3], "eplb", "--replicas", "1", "--out", str(out), "--force"]) == 0
    pfile = read_placement_file(out, num_experts=4, layer_names=["decoder.layers.2"], ranks=2)
    assert pfile.algorithm == "eplb+1 replicas" and sum(map(len, pfile.layers["decoder.layers.2"])) == 5
    assert placement_cli(["evaluate", "--trace", str(trace), "--ranks", "2,4", "--run-dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "anti-correlation" in printed and "greedy+1 replica" in printed and "eplb+1" in printed
    table = json.loads((tmp_path / "run" / "placement.table.json").read_text())
    assert len(table["rows"]) == 1 * 2 * 5  # layers x rank counts x algorithms
    assert placement_cli(["evaluate", "--trace", str(trace), "--ranks", "3"]) == 2


def test_fit_replaces_only_a_placement_file_and_only_with_force(tmp_path, capsys):
    """fit --out: a placement file is replaced with --force only; any other file, and the trace itself, never."""
    trace = _write_trace(tmp_path / "t.npz", num_experts=4)
    out = tmp_path / "p.json"
    fit = ["fit", "--trace", str(trace), "--ranks", "2", "--algorithm", "greedy", "--out"]
    assert placement_cli([*fit, str(out)]) == 0
    capsys.readouterr()
    assert placement_cli([*fit, str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} already holds a placement file (greedy, 2 ranks): pass --force to replace it " \
        "(nothing was written)\n"  # fmt: skip
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    for target in (notes, trace):
        before = target.read_bytes()
        assert placement_cli([*fit, str(target), "--force"]) == 2
        assert target.read_bytes() == before
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {notes} exists and is not a placement file (a file of 11 bytes)")
    assert err[1] == f"error: {trace} is --trace {trace}: the output must be somewhere else (nothing was written)"
    run = tmp_path / "notes"
    run.mkdir()
    (run / "todo.txt").write_text("mine")
    assert placement_cli(["evaluate", "--trace", str(trace), "--ranks", "2", "--run-dir", str(run)]) == 2
    assert "is not a tracked run" in capsys.readouterr().err and [p.name for p in run.iterdir()] == ["todo.txt"]


def test_replicas_split_an_experts_pairs_evenly_and_keep_one_position_per_copy():
    from moe_infer.placement.replicas import ReplicatedPlacement

    placement = ReplicatedPlacement.from_rank_lists([[0, 1], [2, 0, 3]], num_experts=4)  # expert 0 on both ranks
    assert (placement.experts_per_rank, placement.copies(0), placement.local_experts(1)) == (3, 2, [2, 0, 3])
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    positions = placement.pair_positions(experts_TK).tolist()
    # Positions are rank * 3 + slot: expert 0 is at 0 (rank 0) and 4 (rank 1); tokens alternate between its copies.
    assert positions == [0, 1, 4, 3, 0, 5, 4, 1]
    with pytest.raises(PlacementError, match=r"expert\(s\) \[3\] are not placed"):
        ReplicatedPlacement.from_rank_lists([[0, 1], [2, 0]], num_experts=4)
    with pytest.raises(PlacementError, match="holds an expert twice"):
        ReplicatedPlacement.from_rank_lists([[0, 0], [1, 2, 3]], num_experts=4)


def test_trace_files_are_validated(tmp_path):
    experts = torch.tensor([[0, 3], [2, 1]], dtype=torch.int16)
    path = save_traces({"decoder.layers.1": [experts, experts[:1]]}, tmp_path / "t.npz", {"num_experts": 4, "topk": 2})
    layers, meta = load_traces(path)
    assert layers["decoder.layers.1"]["experts"].tolist() == [[0, 3], [2, 1], [0, 3]]
    assert layers["decoder.layers.1"]["batch"].tolist() == [0, 0, 1]
    assert meta["num_experts"] == 4 and not list(tmp_path.glob(".*tmp"))
    save_traces({"decoder.layers.1": [experts + 4]}, tmp_path / "bad.npz", {"num_experts": 4, "topk": 2})
    with pytest.raises(PipelineError, match="outside"):
        load_traces(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="cannot be read"):
        load_traces(tmp_path / "junk.npz")
    with pytest.raises(PipelineError, match="expected topk=3"):
        save_traces({"decoder.layers.1": [experts]}, tmp_path / "k.npz", {"topk": 3})
