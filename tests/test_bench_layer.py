"""The layer benchmark (moe_infer.bench.layer) on two real gloo ranks: every implementation of one MoE layer on the
same weights and tokens, the floors and the dense equivalent, all in its JSON.
"""

import json

import torch

from moe_infer.bench import caches
from moe_infer.bench.cli import main as bench_main
from moe_infer.moe.layer import POLICIES
from pipeline.platform.testing import run_distributed


def _layer_bench(out: str) -> None:
    argv = ["--experts", "8", "--hidden", "16", "--ffn", "32", "--tokens", "40", "--capacity-fraction", "1.0"]
    assert (
        bench_main(["layer", *argv, "--ds-capacity-factor", "8", "--repeats", "2", "--slow-repeats", "2", "--out", out])
        == 0
    )


def test_the_layer_benchmark_compares_every_implementation_on_two_ranks(tmp_path):
    out = tmp_path / "layer.json"
    run_distributed(_layer_bench, world_size=2, args=(str(out),), init_process_group=False, timeout_s=120)
    report = json.loads(out.read_text())
    by_name = {r["name"]: r for r in report["results"]}
    assert report["ranks"] == 2 and report["args"]["caches"] == "cold"  # evicted before each timed call
    floors = {"floor-matmul", "floor-ffn", "floor-grouped-ffn", "floor-per-expert-ffn", "floor-torch-ffn"}
    assert set(by_name) == {*POLICIES, *floors, "dense-equivalent"}
    for r in report["results"]:  # the median of the repeats, with their spread
        assert r["repeats"] == 2 and r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert by_name["dense-equivalent"]["activation_mb"] > 0 and by_name["dense-equivalent"]["ms"] > 0
    for name in POLICIES:  # capacity 1.0 of the tokens per rank, and DeepSpeed's no-drop padding: nothing dropped
        assert by_name[name]["dropped_fraction"] == 0.0
        assert by_name[name]["max_diff_vs_dynamic"] < 1e-5 and by_name[name]["max_diff_vs_reference"] < 1e-5
        assert set(by_name[name]["phases_ms"]) == {"gate", "dispatch", "experts", "combine"}
    assert by_name["static"]["activation_mb"] > by_name["dynamic"]["activation_mb"]
    assert 0 < by_name["dynamic"]["exchange_ms"] < sum(by_name["dynamic"]["phases_ms"].values())


def test_the_layer_benchmark_replaces_only_its_own_result(tmp_path, capfd):
    """--out: anything but a previous layer-bench result is refused before any work (one process, no launcher)."""
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    run = tmp_path / "run"
    argv = ["layer", "--experts", "4", "--hidden", "8", "--ffn", "8", "--tokens", "8", "--repeats", "1"]
    assert bench_main([*argv, "--slow-repeats", "1", "--out", str(notes)]) == 2
    err = capfd.readouterr().err
    assert f"error: {notes} exists and is not a layer-bench result (a file of 11 bytes)" in err, err
    assert bench_main([*argv, "--out", str(run / "layer.json"), "--run-dir", str(run)]) == 2
    assert f"is inside --run-dir {run}" in capfd.readouterr().err
    assert notes.read_text() == '{"mine": 1}' and not run.exists()


def test_the_flush_buffer_is_twice_the_last_level_cache(tmp_path, monkeypatch):
    for index, size in enumerate(("48K", "1024K", "32768K", "")):  # sysfs' sizes; an unreadable one is skipped
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    monkeypatch.setattr(caches, "CPU_CACHES", tmp_path)
    assert caches.last_level_cache_bytes("cpu") == 32 * 2**20
    flush = caches.CacheFlusher("cpu")
    assert flush.buffer.numel() * flush.buffer.element_size() == 64 * 2**20
    flush()
    assert int(flush.buffer[0]) == 1  # read and written
    monkeypatch.setattr(caches, "CPU_CACHES", tmp_path / "missing")
    assert caches.last_level_cache_bytes(torch.device("cpu")) == caches.DEFAULT_CACHE_BYTES
