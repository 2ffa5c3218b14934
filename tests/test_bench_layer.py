"""The layer benchmark (moe_infer.bench.layer) on two real gloo ranks: every implementation of one MoE layer on the
same weights and tokens, the floors and the dense equivalent, all in its JSON.
"""

import json

from moe_infer.bench.cli import main as bench_main
from moe_infer.moe.layer import POLICIES
from pipeline.platform.testing import run_distributed


def _layer_bench(out: str) -> None:
    argv = ["--experts", "8", "--hidden", "16", "--ffn", "32", "--tokens", "40", "--capacity-fraction", "1.0"]
    assert (
        bench_main(["layer", *argv, "--ds-capacity-factor", "8", "--repeats", "1", "--slow-repeats", "1", "--out", out])
        == 0
    )


def test_the_layer_benchmark_compares_every_implementation_on_two_ranks(tmp_path):
    out = tmp_path / "layer.json"
    run_distributed(_layer_bench, world_size=2, args=(str(out),), init_process_group=False, timeout_s=120)
    report = json.loads(out.read_text())
    by_name = {r["name"]: r for r in report["results"]}
    assert report["ranks"] == 2
    assert set(by_name) == {*POLICIES, "floor-matmul", "floor-ffn", "floor-torch-ffn", "dense-equivalent"}
    assert by_name["dense-equivalent"]["activation_mb"] > 0 and by_name["dense-equivalent"]["ms"] > 0
    for name in POLICIES:  # capacity 1.0 of the tokens per rank, and DeepSpeed's no-drop padding: nothing dropped
        assert by_name[name]["dropped_fraction"] == 0.0
        assert by_name[name]["max_diff_vs_dynamic"] < 1e-5
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
