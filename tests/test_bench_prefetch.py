"""Cross-layer prefetch study: ExpertCache.prefetch's contract, a predictable trace (prefetch removes the next
layer's misses), independent layers (it does not, and wastes copies), the fit seeing only the first half, bad input,
and the command line end to end."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from moe_infer.bench import prefetch as pf
from moe_infer.bench.cli import main as bench_cli
from moe_infer.buffering import ExpertCache, simulate
from moe_infer.placement.history import LoadHistory
from pipeline.errors import PipelineError

E, CALLS = 8, 240
PERM = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # layer 2's expert m sends its tokens to layer 4's expert PERM[m]


def _active(rng, calls=CALLS, per_call=2):
    active_BE = np.zeros((calls, E), dtype=np.int64)
    for row in active_BE:
        row[rng.choice(E, size=per_call, replace=False)] = 3
    return active_BE


def _predictable(seed=0, perm_second_half=PERM):
    rng = np.random.default_rng(seed)
    first_BE = _active(rng)
    second_BE = np.zeros_like(first_BE)
    half = CALLS // 2
    second_BE[:half, PERM] = first_BE[:half]
    second_BE[half:, perm_second_half] = first_BE[half:]
    return LoadHistory({"decoder.layers.2": first_BE, "decoder.layers.4": second_BE}, E, "predictable")


def _by(rows):
    return {(r[0], r[1], r[2]): dict(zip(pf.COLUMNS, r, strict=True)) for r in rows}


# ---- ExpertCache.prefetch -------------------------------------------------------------------------------------------


def test_prefetch_copies_without_counting_accesses_and_spares_the_predicted():
    cache = ExpertCache(3, "lru", initial=[0, 1, 2])
    cache.step([0])  # 1 is now the least recently used, then 2
    copies = cache.prefetch([1, 5])  # 1 is predicted: lru may not take it, so 5 evicts 2
    assert [(a.expert, a.evicted) for a in copies] == [(5, 2)]
    assert cache.prefetches == 1 and (cache.hits, cache.misses) == (1, 0)
    assert [a.hit for a in cache.step([1, 5])] == [True, True]
    assert cache.prefetch([1, 5]) == []  # already resident: nothing to copy


def test_prefetch_never_changes_which_experts_run():
    rng = random.Random(0)
    batches = [sorted(rng.sample(range(6), rng.randint(0, 4))) for _ in range(200)]
    for policy in ("paper", "fifo", "lru", "lfu"):
        plain = simulate(batches, 3, policy, initial=[0, 1, 2])
        cache = ExpertCache(3, policy, initial=[0, 1, 2], future=batches)  # the future checks every step
        for batch in batches:
            cache.prefetch(rng.sample(range(6), rng.randint(0, 3)))
            accesses = cache.step(batch)
            assert [a.expert for a in accesses] == batch
        assert cache.accesses == plain.accesses


def test_prefetch_refuses_the_oracle_and_more_experts_than_slots():
    with pytest.raises(PipelineError, match="replay oracle"):
        ExpertCache(2, "belady", initial=[0, 1], future=[[2]]).prefetch([2])
    with pytest.raises(PipelineError, match="exceed 2 slots"):
        ExpertCache(2, "lru").prefetch([0, 1, 2])


# ---- the study ------------------------------------------------------------------------------------------------------


def test_a_predictable_next_layer_loses_all_its_misses():
    rows = _by(pf.prefetch_study(_predictable(), ranks=2, slots=[2], policies=["paper", "lru"]))
    for policy in ("paper", "lru"):
        before = rows["decoder.layers.2", policy, 2]
        assert before["misses"] == before["misses_prefetch"] > 0 and before["prefetched"] == 0  # no predecessor
        after = rows["decoder.layers.4", policy, 2]
        assert after["misses"] > 0 and after["misses_prefetch"] == 0 and after["reduction"] == 1.0
        assert after["wasted"] == 0 and after["copies_prefetch"] == after["prefetched"]
        total = rows["total", policy, 2]
        assert total["misses_prefetch"] == before["misses"]


def test_independent_layers_gain_nothing_and_show_the_wasted_copies():
    rng = np.random.default_rng(1)
    history = LoadHistory(
        {"decoder.layers.2": _active(rng, per_call=3), "decoder.layers.4": _active(rng, per_call=3)}, E
    )
    raw = pf.prefetch_study(history, ranks=2, slots=[2], policies=["paper", "lru"], threshold=0.2)
    for policy in ("paper", "lru"):
        row = _by(raw)["decoder.layers.4", policy, 2]
        assert abs(row["reduction"]) < 0.15, row
        assert row["wasted"] > 0.3 * row["prefetched"] > 0 and row["copies_prefetch"] > row["copies"]
    table = pf.format_tables(raw).split("\n\n")[1].splitlines()  # decoder.layers.4's block
    assert table[1].split()[-1] == "wasted" or table[1].endswith("wasted pf")
    assert all(
        int(line.split()[-1]) == _by(raw)["decoder.layers.4", line.split()[0], 2]["wasted"] for line in table[2:]
    )


def test_the_fit_sees_only_the_first_half(monkeypatch):
    seen = []
    real_fit = pf.fit_transition
    monkeypatch.setattr(
        pf, "fit_transition", lambda a_BE, b_BE, *args: seen.append((a_BE, b_BE)) or real_fit(a_BE, b_BE, *args)
    )
    history = _predictable(perm_second_half=np.roll(PERM, 1))  # the held-out half routes differently
    rows = _by(pf.prefetch_study(history, ranks=2, slots=[2], policies=["lru"]))
    ((source_BE, target_BE),) = seen
    assert np.array_equal(source_BE, history.counts_BE["decoder.layers.2"][: CALLS // 2])
    assert np.array_equal(target_BE, history.counts_BE["decoder.layers.4"][: CALLS // 2])
    row = rows["decoder.layers.4", "lru", 2]
    assert row["misses_prefetch"] > 0 and row["wasted"] > 0  # it learned the first half's routing, not the second's


def test_the_base_rate_control_ignores_the_previous_layer():
    history = _predictable()
    fit, _ = history.split_halves()
    model = pf.fit_transition(fit.counts_BE["decoder.layers.2"], fit.counts_BE["decoder.layers.4"], predictor="base")
    scores_BE = model.scores(_active(np.random.default_rng(2), calls=5) > 0)
    target_BE = fit.counts_BE["decoder.layers.4"] > 0
    assert np.allclose(scores_BE, scores_BE[0]) and np.allclose(scores_BE[0], target_BE.mean(axis=0))


def test_layer_pairs_stay_within_a_stack():
    counts = {name: np.ones((4, E), dtype=np.int64) for name in ("encoder.layers.2", "encoder.layers.4")}
    counts |= {name: np.ones((6, E), dtype=np.int64) for name in ("decoder.layers.2", "decoder.layers.4")}
    assert pf.layer_pairs(LoadHistory(counts, E)) == [
        ("encoder.layers.2", "encoder.layers.4"),
        ("decoder.layers.2", "decoder.layers.4"),
    ]


@pytest.mark.parametrize(
    "layers, kwargs, message",
    [
        ({"decoder.layers.2": 10}, {}, "no two consecutive MoE layers of one stack"),
        ({"encoder.layers.2": 10, "decoder.layers.2": 10}, {}, "no two consecutive MoE layers of one stack"),
        ({"decoder.layers.2": 10, "decoder.layers.4": 12}, {}, "must record the same calls"),
        ({"decoder.layers.2": 10, "decoder.layers.4": 10}, {"ranks": 3}, "do not split the 8 experts"),
        ({"decoder.layers.2": 10, "decoder.layers.4": 10}, {"policies": ["belady"]}, "replay oracle"),
        ({"decoder.layers.2": 10, "decoder.layers.4": 10}, {"threshold": 1.5}, r"probability in \[0, 1\]"),
    ],
)
def test_bad_inputs_are_clear_errors(layers, kwargs, message):
    history = LoadHistory({name: np.ones((calls, E), dtype=np.int64) for name, calls in layers.items()}, E)
    args = {"ranks": 2, "slots": [2], "policies": ["lru"]} | kwargs
    with pytest.raises(PipelineError, match=message):
        pf.prefetch_study(history, **args)


# ---- command line ---------------------------------------------------------------------------------------------------


def test_prefetch_cli_prints_and_logs(tmp_path, capsys):
    trace, run = _predictable().save(tmp_path / "load.npz"), tmp_path / "run"
    assert bench_cli(["prefetch", "--trace", str(trace), "--ranks", "2", "--run-dir", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "predicted: decoder.layers.2 -> decoder.layers.4" in printed
    assert re.search(r"^decoder\.layers\.4\npolicy\s+K\s+stalls\s+stalls\+pf", printed, re.M)
    doc = json.loads((run / "prefetch.json").read_text())
    assert doc["slots"] == [1, 2, 3] and doc["policies"] == ["paper", "lru"] and doc["columns"] == pf.COLUMNS
    assert json.loads((run / "prefetch.table.json").read_text())["rows"] == doc["rows"]
    row = _by(doc["rows"])["decoder.layers.4", "paper", 2]
    assert (
        json.loads((run / "summary.json").read_text())["decoder.layers.4/paper/K2/misses_prefetch"]
        == 0
        == row["misses_prefetch"]
    )


@pytest.mark.parametrize(
    "extra, message",
    [(["--ranks", "3"], "do not split the 8 experts"), (["--slots", "5"], r"each K must be in 1\.\.4")],
)
def test_prefetch_cli_reports_bad_arguments(tmp_path, capsys, extra, message):
    trace = _predictable().save(tmp_path / "load.npz")
    assert bench_cli(["prefetch", "--trace", str(trace), "--ranks", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
