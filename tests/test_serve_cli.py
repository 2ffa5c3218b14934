"""The serving entry point end to end (launch/infer.py -> moe_infer.serve.cli): generation in input order and the same
text on 2 ranks, translation with beam search and BLEU, and bad requests named quickly.

The exports are small random models with a real tokenizer (a tiny sentencepiece model trained here on play text), so
text goes in and comes out. Subprocesses run the launchers as a user would; the single-process error cases call
`main` in the test process (they stop before any collective), which keeps the file fast.
"""

import json
import shutil
import subprocess

import pytest
from cli_exports import GENERATE, PROMPTS, REPO, SOURCES, deepspeed, env, make_cli_exports, run, torchrun

from moe_infer.model import load_model
from moe_infer.runtime.generate import GenerationSettings, generate
from moe_infer.serve.cli import main
from pipeline.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_cli_exports(tmp_path_factory.mktemp("cli"))


def _expected_continuations(export: str, tok: Tokenizer) -> list[str]:
    """What generate gives for the prompts in this process, with every expert (no engine, no launcher)."""
    outputs = generate(load_model(export), tok.encode_batch(PROMPTS), GenerationSettings(max_new_tokens=6))
    return [tok.decode(ids).replace("\n", "\\n") for ids in outputs]


def test_generate_prints_one_continuation_per_prompt_in_order_on_one_and_two_ranks(setup):
    args = ["--export", setup["lm"], "--input", str(setup["root"] / "prompts.txt"), *GENERATE, "--batch-size", "3"]
    single = run(args)
    assert single.returncode == 0, single.stderr
    expected = _expected_continuations(setup["lm"], setup["tok"])
    assert len(set(expected)) > 1  # the order is visible
    assert single.stdout.split("\n")[:-1] == expected
    # Two ranks, the prompts on stdin (rank 0 reads them, the other gets them by broadcast), 2 experts per rank.
    prompts = (setup["root"] / "prompts.txt").read_text()
    command = [*torchrun(2), str(REPO / "launch/infer.py"), "--export", setup["lm"], *GENERATE, "--batch-size", "3"]
    double = subprocess.run(command, input=prompts, capture_output=True, text=True, timeout=120, env=env(), cwd=REPO)
    assert double.returncode == 0, double.stderr
    assert double.stdout == single.stdout


def test_translate_with_beam_search_prints_translations_and_bleu(setup, tmp_path):
    root = setup["root"]
    out = tmp_path / "hyp.txt"
    result = run(
        ["--export", setup["mt"], "--input", str(root / "sources.txt"), "--references", str(root / "refs.txt")]
        + ["--beam-size", "2", "--max-len", "8", "--output", str(out), "--format", "jsonl"]
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in records] == SOURCES and all(isinstance(r["output"], str) for r in records)
    assert "BLEU = " in result.stderr
    assert result.stdout == ""  # the results went to --output


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


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rebalance-interval", "4", "--redundant-experts", "2"], "--redundant-experts: re-balancing: "),
        (["--rebalance-interval", "4", "--policy", "deepspeed"], "needs --policy dynamic or static, not deepspeed"),
        (["--redundant-experts", "2"], "--redundant-experts: only applies with --rebalance-interval"),
    ],
)
def test_bad_rebalancing_flags_are_named(setup, capfd, flags, named):
    code, err = _main(capfd, "--export", setup["lm"], "--input", str(setup["root"] / "prompts.txt"), *flags)
    assert code == 2 and named in err and "Traceback" not in err


def test_two_ranks_on_three_experts_fail_at_once_with_one_message(setup):
    args = ["--export", setup["lm3"], "--input", str(setup["root"] / "prompts.txt"), *GENERATE]
    result = run(args, launcher=deepspeed(2), timeout=90)
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
    result = run(args, launcher=deepspeed(2), timeout=90)
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
    default = run(args, launcher=torchrun(2))
    placed = run([*args, "--placement", str(placement), "--record-trace", str(history)], launcher=torchrun(2))
    assert default.returncode == 0 and placed.returncode == 0, placed.stderr
    assert placed.stdout == default.stdout
    loads = LoadHistory.read(history)
    assert loads.layer_names == ["decoder.layers.2", "decoder.layers.4"]
    assert all(counts_BE.sum() > 0 for counts_BE in loads.counts_BE.values())
    wrong = run([*args, "--placement", str(placement)])  # a file for 2 ranks, served by one
    assert wrong.returncode != 0 and "placement for 2 ranks" in wrong.stderr
