"""The serving entry point end to end (launch/infer.py -> moe_infer.engine.cli): generation in input order and the same
text on 2 ranks, translation with beam search and BLEU, the benchmark's files, and bad requests named quickly.

The exports are small random models with a real tokenizer (a tiny sentencepiece model trained here on play text), so
text goes in and comes out. Subprocesses run the launchers as a user would; the single-process error cases call
`main` in the test process (they stop before any collective), which keeps the file fast.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from random_exports import random_export_config, write_random_export

from moe_infer.engine.cli import main
from moe_infer.model import load_model
from moe_infer.runtime.generate import GenerationSettings, generate
from pipeline.platform.device import free_port
from pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEXT = (REPO / "pipeline/data/fixtures/shakespeare/macbeth.md").read_text().splitlines()[:1500]
PROMPTS = ["Fair is foul", "When shall we three meet again", "Macbeth", "The thane of Cawdor lives"]
SOURCES = ["So foul and fair a day", "Double, double toil and trouble"]
GENERATE = ["--max-new-tokens", "6", "--quiet"]


def _write_export(path: Path, config: dict, tokenizer: Tokenizer, seed: int = 0) -> str:
    """A random export whose tokenizer is a real one of the same vocabulary."""
    config["model"]["vocab_size"] = config["tokenizer"]["vocab_size"] = tokenizer.vocab_size
    return str(write_random_export(path, config, seed, tokenizer.model_proto))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(TEXT, TokenizerConfig(vocab_size=400), root / "tokenizers")
    varied = dict(tie_embeddings=False, norm="rmsnorm", activation="swiglu")  # outputs that differ by prompt
    exports = {
        "lm": _write_export(root / "lm", random_export_config("decoder", **varied), tok),
        "mt": _write_export(root / "mt", random_export_config("encoder-decoder", lm_head_bias=False, **varied), tok),
        "lm3": _write_export(root / "lm3", random_export_config("decoder", num_experts=3, topk=1), tok),
    }
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "sources.txt").write_text("\n".join(SOURCES) + "\n")
    (root / "refs.txt").write_text("Si laid et si beau un jour\nDouble, double peine et trouble\n")
    return {"root": root, "tok": tok, **exports}


def _env(**extra) -> dict:
    # One thread per rank: the two ranks share a small machine. W&B stays off unless a test turns it on.
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


def _run(args: list[str], launcher: list[str] | None = None, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(REPO / "launch/infer.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=REPO)


def _torchrun(ranks: int) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc-per-node={ranks}", f"--master-port={free_port()}"]


def _deepspeed(ranks: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]


def _expected_continuations(export: str, tok: Tokenizer) -> list[str]:
    """What generate gives for the prompts in this process, with every expert (no engine, no launcher)."""
    outputs = generate(load_model(export), tok.encode_batch(PROMPTS), GenerationSettings(max_new_tokens=6))
    return [tok.decode(ids).replace("\n", "\\n") for ids in outputs]


def test_generate_prints_one_continuation_per_prompt_in_order_on_one_and_two_ranks(setup):
    args = ["--export", setup["lm"], "--input", str(setup["root"] / "prompts.txt"), *GENERATE, "--batch-size", "3"]
    single = _run(args)
    assert single.returncode == 0, single.stderr
    expected = _expected_continuations(setup["lm"], setup["tok"])
    assert len(set(expected)) > 1  # the order is visible
    assert single.stdout.split("\n")[:-1] == expected
    # Two ranks, the prompts on stdin (rank 0 reads them, the other gets them by broadcast), 2 experts per rank.
    prompts = (setup["root"] / "prompts.txt").read_text()
    command = [*_torchrun(2), str(REPO / "launch/infer.py"), "--export", setup["lm"], *GENERATE, "--batch-size", "3"]
    double = subprocess.run(command, input=prompts, capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert double.returncode == 0, double.stderr
    assert double.stdout == single.stdout


def test_translate_with_beam_search_prints_translations_and_bleu(setup, tmp_path):
    root = setup["root"]
    out = tmp_path / "hyp.txt"
    result = _run(
        ["--export", setup["mt"], "--input", str(root / "sources.txt"), "--references", str(root / "refs.txt")]
        + ["--beam-size", "2", "--max-len", "8", "--output", str(out), "--format", "jsonl"]
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in records] == SOURCES and all(isinstance(r["output"], str) for r in records)
    assert "BLEU = " in result.stderr
    assert result.stdout == ""  # the results went to --output


def test_bench_writes_rows_for_each_policy_and_an_offline_wandb_run(setup, tmp_path):
    run_dir = tmp_path / "bench"
    args = ["--export", setup["lm"], "--mode", "bench", "--policies", "dynamic,static,dense-equivalent"]
    args += ["--max-batch", "2"]
    args += ["--decode-steps", "2", "--prompt-len", "8", "--run-dir", str(run_dir), "--quiet"]
    result = _run(args, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-home"))
    assert result.returncode == 0, result.stderr
    bench = json.loads((run_dir / "bench.json").read_text())
    assert [(r["policy"], r["batch_per_rank"]) for r in bench["rows"]] == [
        ("dynamic", 1),
        ("dynamic", 2),
        ("static", 1),
        ("static", 2),
        ("dense-equivalent", 1),
        ("dense-equivalent", 2),
    ]
    for row in bench["rows"]:
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
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and "static/decode_tok_s" in metrics[3]
    assert (run_dir / "bench.table.json").is_file()
    assert "dynamic" in result.stdout and "static" in result.stdout


# ---- bad requests: one clear message, a non-zero status, no hang ---------------------------------------------------


def _main(capfd, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capfd.readouterr().err


def test_a_missing_export_is_named(capfd, tmp_path):
    code, err = _main(capfd, "--export", str(tmp_path / "nowhere"), "--input", str(tmp_path / "none.txt"))
    assert code == 1 and f"error: no export at {tmp_path / 'nowhere'}" in err


def test_bad_requests_are_named_by_line_before_any_work(setup, capfd, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("Fair is foul\n\nMacbeth\n")
    code, err = _main(capfd, "--export", setup["lm"], "--input", str(lines), *GENERATE)
    assert code == 2 and "error: prompt on line 2 of" in err and "is empty" in err
    lines.write_text("Macbeth\n" + " ".join(["Macbeth"] * 40) + "\n")  # the random exports have 32 positions
    code, err = _main(capfd, "--export", setup["lm"], "--input", str(lines), *GENERATE)
    assert code == 2 and "error: prompt on line 2 of" in err and "beyond the model's limit of 32" in err
    code, err = _main(capfd, "--export", setup["mt"], "--mode", "generate", "--input", str(lines))
    assert code == 2 and "use --mode translate" in err
    code, err = _main(capfd, "--export", setup["lm"], "--input", str(lines), "--top-p", "0")
    assert code == 2 and "top_p" in err
    assert "Traceback" not in err


def test_bench_serving_settings_are_checked_before_any_engine_starts(setup, capfd, tmp_path):
    prompts = str(setup["root"] / "prompts.txt")
    bench = ["--export", setup["lm"], "--mode", "bench-serving", "--input", prompts, *GENERATE]
    bench += ["--run-dir", str(tmp_path / "b")]
    code, err = _main(capfd, *bench, "--slots-sweep", "1,4")  # the random LM has 4 experts, all local on one rank
    assert code == 2 and "[4] slots would hold every one of the 4 local experts" in err
    code, err = _main(capfd, *bench, "--placements", str(tmp_path / "missing.json"))
    assert code == 1 and "missing.json: cannot read the placement file" in err
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_two_ranks_on_three_experts_fail_at_once_with_one_message(setup):
    args = ["--export", setup["lm3"], "--input", str(setup["root"] / "prompts.txt"), *GENERATE]
    result = _run(args, launcher=_deepspeed(2), timeout=90)
    assert result.returncode != 0
    assert "3 experts per MoE layer, which cannot be split evenly over 2 ranks" in result.stderr
    assert result.stderr.count("cannot be split evenly") == 1  # rank 0 speaks for both
    assert "Traceback" not in result.stderr


def test_a_failure_on_one_rank_ends_every_rank_with_the_cause(setup, tmp_path):
    """Rank 1 alone reads experts 2 and 3: a corrupt expert 3 stops it at load time, and rank 0, already waiting in a
    collective, is ended too (the launcher stops it; the collective timeout is the backstop), never a hang."""
    export = shutil.copytree(setup["lm"], tmp_path / "lm")
    victim = export / "experts" / "decoder.layer02.expert0003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    args = ["--export", str(export), "--input", str(setup["root"] / "prompts.txt"), *GENERATE, "--timeout", "60"]
    result = _run(args, launcher=_deepspeed(2), timeout=90)
    assert result.returncode != 0
    assert (
        "error (rank 1 of 2)" in result.stderr and "decoder.layer02.expert0003.safetensors has sha256" in result.stderr
    )


def test_a_placement_file_with_replicas_and_a_recorded_load_history(setup, tmp_path):
    """Two ranks serve with a placement that copies expert 1 onto both: the same text as the default placement; the
    recorded load history covers both MoE layers and can be fitted from."""
    from moe_infer.placement.files import write_placement_file
    from moe_infer.placement.history import LoadHistory

    placement = tmp_path / "placement.json"
    layers = {"decoder.layers.2": [[3, 1], [0, 2, 1]], "decoder.layers.4": [[2, 0, 1], [3, 1]]}
    write_placement_file(placement, layers, num_experts=4, algorithm="hand-made", source="test")
    history = tmp_path / "loads.npz"
    args = ["--export", setup["lm"], "--input", str(setup["root"] / "prompts.txt"), *GENERATE]
    default = _run(args, launcher=_torchrun(2))
    placed = _run([*args, "--placement", str(placement), "--record-trace", str(history)], launcher=_torchrun(2))
    assert default.returncode == 0 and placed.returncode == 0, placed.stderr
    assert placed.stdout == default.stdout
    loads = LoadHistory.read(history)
    assert loads.layer_names == ["decoder.layers.2", "decoder.layers.4"]
    assert all(counts_BE.sum() > 0 for counts_BE in loads.counts_BE.values())
    wrong = _run([*args, "--placement", str(placement)])  # a file for 2 ranks, served by one
    assert wrong.returncode != 0 and "placement for 2 ranks" in wrong.stderr


def test_bench_serving_compares_buffering_and_placements_on_the_same_requests(setup, tmp_path):
    """Two ranks: the baseline, expert buffering with one slot (of 2 local experts) and a replicated placement serve
    the same prompts with the same outputs (the bench fails otherwise), and each gets its figures."""
    from moe_infer.placement.files import write_placement_file

    placement = tmp_path / "replicas.json"
    layers = {"decoder.layers.2": [[3, 1], [0, 2, 1]], "decoder.layers.4": [[2, 0, 1], [3, 1]]}
    write_placement_file(placement, layers, num_experts=4, algorithm="hand-made", source="test")
    run_dir = tmp_path / "serving"
    args = ["--export", setup["lm"], "--mode", "bench-serving", "--input", str(setup["root"] / "prompts.txt")]
    args += [*GENERATE, "--slots-sweep", "1", "--evictions", "paper,lru", "--placements", str(placement)]
    args += ["--repeats", "1", "--run-dir", str(run_dir), "--quiet"]
    result = _run(args, launcher=_torchrun(2), timeout=180)
    assert result.returncode == 0, result.stderr
    rows = {r["variant"]: r for r in json.loads((run_dir / "serving.json").read_text())["rows"]}
    assert list(rows) == ["baseline", "paper K=1", "lru K=1", "placement replicas"]
    for name in ("paper K=1", "lru K=1"):
        assert rows[name]["memory_saving"] == pytest.approx(2.0) and rows[name]["misses"] > 0
        assert rows[name]["copied_mb"] > 0 and rows[name]["hits"] + rows[name]["misses"] > 0
    assert rows["baseline"]["misses"] == 0 and rows["placement replicas"]["expert_mb_per_rank"] > 0
    assert all(0 < r["rank_balance"] <= 1 and r["tok_s"] > 0 for r in rows.values())
    assert "placement replicas" in result.stdout
