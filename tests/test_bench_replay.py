"""The replay study (moe_infer.bench.replay) end to end: recorded expert loads through every eviction policy and
cache size, Belady's MIN last and lowest, with placements and layer subsets, and bad arguments named; also under its
old name, `python -m moe_infer.buffering replay`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_infer.bench.cli import main as bench_cli
from moe_infer.placement.files import write_placement_file
from moe_infer.placement.history import LoadHistory

REPO = Path(__file__).resolve().parent.parent


def _tables(printed: str) -> dict[str, list[str]]:
    """{layer: [policy names in row order]} from the printed miss-rate tables."""
    lines, tables = printed.splitlines(), {}
    for i, line in enumerate(lines):
        if line.startswith("miss rate"):
            body = lines[i + 1 : lines.index("", i) if "" in lines[i:] else None]
            tables[lines[i - 1]] = [row.split()[0] for row in body]
    return tables


def _trace(tmp_path, num_experts=8, batches=30):
    rng = np.random.default_rng(0)
    # Sparse counts, so some local experts sit out some batches (the trained model's batches activate all of them).
    counts = {
        layer: rng.integers(0, 5, size=(batches, num_experts)) * (rng.random((batches, num_experts)) < 0.5)
        for layer in ("decoder.layers.2", "decoder.layers.4")
    }
    return LoadHistory(counts_BE=counts, num_experts=num_experts).save(tmp_path / "load.npz")


def test_replay_cli_prints_belady_last_and_lowest(tmp_path, capsys):
    trace, run = _trace(tmp_path), tmp_path / "run"
    assert bench_cli(["replay", "--trace", str(trace), "--ranks", "2", "--run-dir", str(run)]) == 0
    printed = capsys.readouterr().out
    tables = _tables(printed)
    assert list(tables) == ["decoder.layers.2", "decoder.layers.4", "total"]
    assert all(rows == ["paper", "fifo", "lru", "lfu", "belady"] for rows in tables.values())
    assert "misses / belady misses at K = L/2 = 2" in printed
    doc = json.loads((run / "replay.json").read_text())
    assert doc["slots"] == [1, 2, 3, 4] and doc["columns"][:3] == ["layer", "policy", "slots"]
    misses = {(layer, policy, k): m for layer, policy, k, _, m, *_ in doc["rows"]}
    for (layer, _, k), count in misses.items():
        assert misses[layer, "belady", k] <= count
    for k in range(1, 5):  # the total is the sum of the layers
        assert misses["total", "lru", k] == misses["decoder.layers.2", "lru", k] + misses["decoder.layers.4", "lru", k]
    assert all(misses[layer, policy, 4] == 0 for layer, policy, _ in misses)  # K = L: everything starts resident
    assert all(ratio >= 1 for ratio in doc["misses_over_belady"]["total"].values())
    table = json.loads((run / "buffering.table.json").read_text())
    assert table["rows"] == doc["rows"]
    rate = next(row[6] for row in doc["rows"] if row[:3] == ["total", "belady", 2])
    assert json.loads((run / "summary.json").read_text())["total/belady/K2/miss_rate"] == rate


def test_replay_cli_with_a_replicated_placement_and_subsets(tmp_path, capsys):
    trace = _trace(tmp_path)
    placement = tmp_path / "p.json"
    layers = {"decoder.layers.2": [[0, 1, 2, 3, 4], [4, 5, 6, 7]], "decoder.layers.4": [[7, 6, 5, 4], [3, 2, 1, 0]]}
    write_placement_file(placement, layers, num_experts=8)
    argv = ["replay", "--trace", str(trace), "--placement", str(placement), "--slots", "1,2,5"]
    assert bench_cli([*argv, "--policies", "lru,belady,paper", "--layers", "decoder.layers.2"]) == 0
    tables = _tables(capsys.readouterr().out)
    assert tables == {"decoder.layers.2": ["lru", "paper", "belady"], "total": ["lru", "paper", "belady"]}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ranks", "3"], "do not split the 8 experts"),
        (["--ranks", "2", "--slots", "0,2"], r"each K must be in 1\.\.4"),
        (["--ranks", "2", "--slots", "5"], r"each K must be in 1\.\.4"),
        (["--policies", "paper,mru"], "unknown eviction policy 'mru'"),
        (["--layers", "decoder.layers.9"], "unknown layer"),
    ],
)
def test_replay_cli_reports_bad_arguments(tmp_path, capsys, extra, message):
    trace = _trace(tmp_path)
    assert bench_cli(["replay", "--trace", str(trace), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


def test_replay_keeps_its_old_command(tmp_path):
    trace = _trace(tmp_path)
    command = [sys.executable, "-m", "moe_infer.buffering", "replay", "--trace", str(trace), "--ranks", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "misses / belady misses at K = L/2 = 2" in result.stdout


def test_replay_and_prefetch_add_only_to_a_run_of_their_own(tmp_path, capsys):
    """--run-dir: a directory that is not a tracked run is refused before any work, and left as it was."""
    trace, notes = _trace(tmp_path), tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for study in ("replay", "prefetch"):
        assert bench_cli([study, "--trace", str(trace), "--ranks", "2", "--run-dir", str(notes)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {notes} exists and is not a tracked run (a directory holding 1 entry"), err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    run = tmp_path / "run"
    assert bench_cli(["replay", "--trace", str(trace), "--ranks", "2", "--run-dir", str(run)]) == 0
    assert bench_cli(["replay", "--trace", str(trace), "--ranks", "2", "--run-dir", str(run)]) == 0  # its own: again
