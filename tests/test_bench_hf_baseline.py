"""transformers as a baseline of the model sweep (moe_infer.bench.hf_baseline) through `launch/infer.py --mode bench
--policies ...,transformers`: every experts implementation named (timed, or why not), interleaved medians with their
spread next to our engine; refused in one line for an export with no Qwen3-MoE equivalent or more than one rank;
without transformers, only the baseline is refused (test_imports.py: moe_infer imports it only inside functions)."""

import argparse
import json
import re
import sys

import pytest
from cli_exports import run
from random_exports import random_export_config, write_random_export

from moe_infer.bench import hf_baseline
from moe_infer.model.loader import Export
from pipeline.errors import ConfigError

QWEN = dict(position_embedding="rope", norm="rmsnorm", activation="swiglu", bias=False, qk_norm=True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-bench")
    return {
        "qwen": write_random_export(root / "qwen", random_export_config("decoder", **QWEN), seed=3),
        "lm": write_random_export(root / "lm", random_export_config("decoder"), seed=3),
    }


def test_transformers_is_timed_beside_our_engine_per_experts_implementation(exports, tmp_path):
    run_dir = tmp_path / "bench"
    args = ["--export", str(exports["qwen"]), "--mode", "bench", "--policies", "dynamic,transformers"]
    args += ["--max-batch", "2", "--hf-repeats", "2", "--decode-steps", "2", "--prompt-len", "8"]
    result = run([*args, "--run-dir", str(run_dir), "--quiet"])
    assert result.returncode == 0, result.stderr
    bench = json.loads((run_dir / "bench.json").read_text())
    figures = bench["transformers"]
    timed = [v for v in figures["variants"] if v.startswith("transformers[")]
    # transformers 5.24 on CPU: eager, grouped_mm and batched_mm run; the CUDA/bf16-only kernels are named, not timed
    assert {"transformers[eager]", "transformers[grouped_mm]"} <= set(timed)
    assert set(timed) | set(figures["unavailable"]) == {f"transformers[{i}]" for i in hf_baseline._implementations()}
    assert figures["variants"][0] == hf_baseline.OURS and figures["repeats"] == 2
    for variant in figures["variants"]:
        for batch in ("1", "2"):
            spread = figures["figures"][variant][batch]["decode_tok_s"]
            assert len(spread["values"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    policies = [(r["policy"], r["batch_per_rank"]) for r in bench["rows"]]
    assert policies[:2] == [("dynamic", 1), ("dynamic", 2)]
    assert policies[2:] == [(v, b) for b in (1, 2) for v in figures["variants"]]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in bench["rows"])
    assert "median [min-max] of 2 interleaved rounds" in result.stdout
    assert all(name in result.stdout for name in figures["variants"] + list(figures["unavailable"]))


def test_the_baseline_is_refused_before_anything_starts(exports, tmp_path):
    args = ["--export", str(exports["lm"]), "--mode", "bench", "--policies", "transformers", "--prompt-len", "8"]
    result = run([*args, "--decode-steps", "2", "--quiet"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "has no Qwen3-MoE equivalent: model.norm" in result.stderr
    args = argparse.Namespace(policies=["transformers"], hf_repeats=5)
    with pytest.raises(ConfigError, match="runs in one process .*, not 2 ranks"):
        hf_baseline.check(args, Export.open(exports["qwen"]), world=2)
    hf_baseline.check(argparse.Namespace(policies=["dynamic"], hf_repeats=0), Export.open(exports["lm"]), world=2)


def test_without_transformers_only_the_baseline_is_refused(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of transformers now fails
    export = Export.open(exports["qwen"])
    hf_baseline.check(argparse.Namespace(policies=["dynamic"], hf_repeats=5), export, 1)
    with pytest.raises(ConfigError, match=re.escape("needs transformers: pip install -e '.[hf]'")):
        hf_baseline.check(argparse.Namespace(policies=["transformers"], hf_repeats=5), export, 1)
