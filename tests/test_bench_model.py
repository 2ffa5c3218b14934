"""The model sweep (moe_infer.bench.model) through `launch/infer.py --mode bench`: a row per policy and batch size,
bench.json, metrics and an offline W&B run."""

import json

import pytest
from cli_exports import make_cli_exports, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_cli_exports(tmp_path_factory.mktemp("cli"))


def test_bench_writes_rows_for_each_policy_and_an_offline_wandb_run(setup, tmp_path):
    run_dir = tmp_path / "bench"
    args = ["--export", setup["lm"], "--mode", "bench", "--policies", "dynamic,static,dense-equivalent"]
    args += ["--max-batch", "2", "--repeats", "2"]
    args += ["--decode-steps", "2", "--prompt-len", "8", "--run-dir", str(run_dir), "--quiet"]
    result = run(args, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-home"))
    assert result.returncode == 0, result.stderr
    bench = json.loads((run_dir / "bench.json").read_text())
    assert [(r["policy"], r["batch_per_rank"]) for r in bench["rows"]] == [
        ("dynamic", 1),
        ("static", 1),
        ("dense-equivalent", 1),
        ("dynamic", 2),
        ("static", 2),
        ("dense-equivalent", 2),
    ]
    for row in bench["rows"]:  # every timed figure the median of the interleaved repeats, with its min-max
        assert row["repeats"] == 2
        for name in ("prefill_ms", "prefill_tok_s", "decode_ms_per_step", "decode_tok_s"):
            assert row["spread"][f"{name}_min"] <= row[name] <= row["spread"][f"{name}_max"]
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["moe_act_mb"] > 0
        assert sorted(row["layers"]) == ["decoder.layers.2", "decoder.layers.4"]
        assert set(row["layers"]["decoder.layers.2"]["prefill"]) == {"gate", "dispatch", "experts", "combine"}
        assert 0 <= row["dropped_prefill"] <= 1
    assert bench["rows"][0]["dropped_prefill"] == 0  # dynamic drops nothing
    assert bench["limits"] == {"dynamic": None, "static": None, "dense-equivalent": None}
    dense = bench["rows"][-1]["layers"]["decoder.layers.2"]["prefill"]  # no router, no exchange: all expert time
    assert dense["experts"] > 0 and dense["gate"] == dense["dispatch"] == dense["combine"] == 0
    assert list((run_dir / "wandb").glob("offline-run-*"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and "static/decode_tok_s" in metrics[4]
    assert "static/decode_tok_s_min" in metrics[4]
    assert (run_dir / "bench.table.json").is_file()
    assert "dynamic" in result.stdout and "static" in result.stdout
