"""The serving entry point end to end (launch/infer.py -> moe_infer.serve.cli): generation in input order and the same
text on 2 ranks, translation with beam search and BLEU, and bad requests named quickly.

The exports are small random models with a real tokenizer (a tiny sentencepiece model trained here on play text), so
text goes in and comes out. Subprocesses run the launchers as a user would; the single-process error cases call
`main` in the test process (they stop before any collective), which keeps the file fast.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
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


# Slow: the default suite launches the same refusal under torchrun (test_every_failing_launch_shows_the_error_line)
# and the deepspeed launcher in test_a_failure_on_one_rank_ends_every_rank_with_the_cause.
@pytest.mark.slow
def test_two_ranks_on_three_experts_fail_at_once_with_one_message(setup):
    args = ["--export", setup["lm3"], "--input", str(setup["root"] / "prompts.txt"), *GENERATE]
    result = run(args, launcher=deepspeed(2), timeout=90)
    assert result.returncode != 0
    assert "3 experts per MoE layer, which cannot be split evenly over 2 ranks" in result.stderr
    assert result.stderr.count("cannot be split evenly") in (1, 2)  # usually rank 0 alone (serve.process.say_once)
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


def test_requests_that_are_not_text_are_refused_by_line(setup, capfd, tmp_path):
    """Only spaces, or a control character such as NUL, is a damaged or binary input, not a prompt: refused."""
    lines = tmp_path / "lines.txt"
    for body, problem in [("Macbeth\n   \n", "holds only whitespace"), ("Mac\0beth\n", "control character '\\x00'")]:
        lines.write_text(body)
        code, err = _main(capfd, "--export", setup["lm"], "--input", str(lines), *GENERATE)
        line = body.count("\n")
        assert code == 2 and err.startswith(f"error: prompt on line {line} of {lines} ") and problem in err
    lines.write_text("Fair\tis foul\n")  # a tab is text
    code, err = _main(capfd, "--export", setup["lm"], "--input", str(lines), *GENERATE)
    assert code == 0, err


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error")]


def _our_traceback(text: str) -> bool:
    """Whether `text` holds a traceback through our code (torchrun prints its own on a failed rank)."""
    return any(f'File "{REPO / part}' in text for part in ("launch", "moe_infer", "pipeline"))


def test_invalid_utf8_is_one_line_from_stdin_as_from_a_file(setup, tmp_path):
    """The same bytes through --input and on stdin (one process, and two ranks where rank 0 reads it): one line."""
    data = b"Fair is foul\nMac\xffbeth\n"
    (tmp_path / "bad.txt").write_bytes(data)
    command = [str(REPO / "launch/infer.py"), "--export", setup["lm"], *GENERATE]
    options = dict(capture_output=True, env=env(), cwd=REPO, timeout=120)
    runs = {
        "file": subprocess.run([sys.executable, *command, "--input", str(tmp_path / "bad.txt")], **options),
        "stdin": subprocess.run([sys.executable, *command], input=data, **options),
        "stdin, 2 ranks": subprocess.run([*torchrun(2), *command], input=data, **options),
    }
    for how, result in runs.items():
        err = result.stderr.decode()
        lines = _error_lines(err)
        assert result.returncode != 0 and lines and not _our_traceback(err), (how, err[-2000:])
        assert set(lines) == {lines[0]} and "'utf-8' codec can't decode byte 0xff in position 16" in lines[0], how


def test_outputs_replace_only_what_is_theirs_and_never_an_input(setup, capfd, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path / "cache"))  # where the results files we wrote are recorded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Macbeth\n")
    out = tmp_path / "out.txt"
    args = ["--export", setup["lm"], "--input", str(prompts), *GENERATE]
    assert _main(capfd, *args, "--output", str(out))[0] == 0
    code, err = _main(capfd, *args, "--output", str(out))
    assert code == 2 and err.startswith(f"error: {out} already holds results written by launch/infer.py at ")
    assert "pass --force" in err
    assert _main(capfd, *args, "--output", str(out), "--force")[0] == 0
    # A results file is ours only as we wrote it: the user's own file, or ours once they edited it, is refused.
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    out.write_text(out.read_text() + "my note\n")
    for victim in (mine, out):
        before = victim.read_text()
        code, err = _main(capfd, *args, "--output", str(victim), "--force")
        assert code == 2 and err.startswith(f"error: {victim} exists and is not a results file of this command ("), err
        assert (
            "--force replaces only results this command wrote, unchanged since" in err and victim.read_text() == before
        )
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    refused = {
        ("--output", str(prompts)): f"error: {prompts} is --input {prompts}: the output must be somewhere else",
        (
            "--output",
            str(notes),
        ): f"error: {notes} exists and is not a results file of this command (a directory holding",
        ("--output", setup["lm"] + "/out.txt"): "is inside --export",
        ("--record-trace", str(notes / "todo.txt")): "exists and is not a load history (a file of 4 bytes)",
        ("--run-dir", str(notes)): "exists and is not a tracked run",
    }
    for flag, expected in refused.items():
        code, err = _main(capfd, *args, *flag, "--force")
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, (flag, err)
    assert prompts.read_text() == "Macbeth\n" and [p.name for p in notes.iterdir()] == ["todo.txt"]
    assert (notes / "todo.txt").read_text() == "mine" and not (Path(setup["lm"]) / "out.txt").exists()


# ---- under a launcher: the message shown whichever rank exits first; a rank stops with its launcher ----------------

# Errors every rank meets alike before any collective; which rank the launcher sees exit first is a race.
SAME_ON_EVERY_RANK = {
    "3 experts on 2 ranks": (["--export", "lm3"], "error: ", "cannot be split evenly over 2 ranks"),
    "--max-new-tokens -1": (["--max-new-tokens", "-1"], "error: ", "max_new_tokens"),
    "--batch-size 0": (["--batch-size", "0"], "error: ", "batch_size"),
    "truncated config.json": (["--export", "truncated"], "error: ", "config.json"),
    "usage": (["--bogus"], "error: unrecognized arguments: --bogus (launch/infer.py --help lists the options)", ""),
}


def _failing_launch(setup, tmp_path, case: str) -> str:
    args, start, inside = SAME_ON_EVERY_RANK[case]
    export = setup["lm"]
    if "lm3" in args:
        export = setup["lm3"]
    elif "truncated" in args:
        export = tmp_path / "truncated"
        if not export.exists():
            shutil.copytree(setup["lm"], export)
            config = export / "config.json"
            config.write_text(config.read_text()[:100])
    extra = [a for a in args if a not in ("--export", "lm3", "truncated")]
    argv = ["--export", str(export), "--input", str(setup["root"] / "prompts.txt"), *GENERATE, *extra]
    result = run(argv, launcher=torchrun(2), timeout=120)
    lines = _error_lines(result.stderr)
    assert result.returncode != 0 and lines, (case, result.stderr[-3000:])
    assert all(line.startswith(start) and inside in line for line in lines), (case, lines)
    assert len(lines) <= 2 and not _our_traceback(result.stderr) and "usage:" not in result.stderr, case
    return result.stderr


def test_a_rank_other_than_0_shows_an_error_every_rank_met_too(monkeypatch, capfd):
    """The race, made certain: rank 1 (a launcher's view) meets an error every rank meets alike. It says it too
    (after a wait in which rank 0 usually has said it and the launcher stopped this rank): when rank 1 exits first,
    the launcher may stop rank 0 before it prints. Before, only rank 0 printed it."""
    from moe_infer.serve import process

    monkeypatch.setattr(process, "QUIET_RANK_DELAY_S", 0.0, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with process.launched(quiet=True) as command:
        raise process.ConfigError("--batch-size", "must be at least 1, got 0")
    assert command.status == 2 and capfd.readouterr().err == "error: --batch-size: must be at least 1, got 0\n"


# "3 experts on 2 ranks" in make test-all: the deterministic rank-1 test above catches the lost line every time.
@pytest.mark.parametrize("case", [pytest.param("3 experts on 2 ranks", marks=pytest.mark.slow), "usage"])
def test_every_failing_launch_shows_the_error_line(setup, tmp_path, case):
    for _ in range(2):
        _failing_launch(setup, tmp_path, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SAME_ON_EVERY_RANK))
def test_the_error_line_survives_many_launches(setup, tmp_path, case):
    for _ in range(6):
        _failing_launch(setup, tmp_path, case)


def test_killing_the_launcher_stops_the_serving_ranks(setup, tmp_path):
    """torchrun starts ranks in sessions of their own: a kill of its process group must still end them (the launcher
    watch), here while they serve."""
    prompts = tmp_path / "many.txt"
    prompts.write_text("Fair is foul\n" * 20000)
    command = [*torchrun(2), str(REPO / "launch/infer.py"), "--export", setup["lm"], "--input", str(prompts)]
    command += ["--max-new-tokens", "20", "--batch-size", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                            cwd=REPO, start_new_session=True)  # fmt: skip
    ranks = []
    try:
        for line in proc.stderr:  # rank 0's progress line: the engine has started and serving begins
            if line.startswith("serving "):
                break
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) >= 2 and proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        for p in [proc, *ranks]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        proc.wait()


@pytest.mark.slow  # a deepspeed launch: over a minute on 2 shared cores
def test_make_infer_prints_the_results_alone_on_stdout(setup):
    """`make infer` (the deepspeed launcher, which logs to stdout): stdout holds the results and nothing else."""
    venv = Path(sys.executable).parent.parent
    args = f"--input {setup['root'] / 'prompts.txt'} {' '.join(GENERATE)}"
    command = ["make", "-o", "setup", "infer", f"VENV={venv}", f"EXPORT={setup['lm']}", f"ARGS={args}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=REPO, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _expected_continuations(setup["lm"], setup["tok"])
    assert result.stdout.split("\n")[:-1] == expected, result.stdout
