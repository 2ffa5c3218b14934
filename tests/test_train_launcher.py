"""Training under a real launcher (torchrun, 2 gloo ranks): the ranks stop when the launcher is killed, every failing
launch shows the project's own error line (tested in a loop: which rank exits first is a race), a damaged checkpoint
stops every rank before any step with the file named and nothing new written, and --resume-from continues from an
older checkpoint."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_train import LM_TINY, _losses

from pipeline.train import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parent.parent
STEPS = [*LM_TINY, "train.eval_interval=1000"]
# Launches per failure case in the default suite (which rank exits first is a race); the slow test repeats one more.
LAUNCHES = 2


def _torchrun(run_dir: Path, *args: str, overrides=(), env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "launch/train.py"), "--config", "lm-tiny", "--run-dir", str(run_dir), *args]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _run(run_dir: Path, *args: str, overrides=(), env=None, timeout_s: float = 240) -> tuple[int, str]:
    proc = _torchrun(run_dir, *args, overrides=overrides, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        _stop(proc)
    return proc.returncode, out


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL whatever of the job is still running (the launcher and, in sessions of their own, its ranks)."""
    job = []
    with contextlib.suppress(psutil.NoSuchProcess):
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in job:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(job, timeout=30)
    proc.wait()


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("launcher") / "run"
    rc, out = _run(run_dir, overrides=[*STEPS, "train.steps=8", "train.save_interval=4"])
    assert rc == 0, out[-3000:]
    return run_dir


def test_killing_the_launcher_stops_its_ranks_within_seconds(tmp_path):
    run_dir = tmp_path / "run"
    # A checkpoint every step: the kill lands during or between saves.
    proc = _torchrun(run_dir, overrides=[*STEPS, "train.steps=100000", "train.save_interval=1"])
    ranks = []
    try:
        deadline = time.monotonic() + 240
        while max(_losses(run_dir), default=0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started"
            time.sleep(0.05)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) >= 2
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group: torchrun's ranks are not in it
        start = time.monotonic()
        _, alive = psutil.wait_procs(ranks, timeout=20)
        stopped_after = time.monotonic() - start
        assert not alive, f"still running {stopped_after:.0f} s after the launcher died: {[p.pid for p in alive]}"
    finally:
        _stop(proc)
        for rank in ranks:  # whatever the outcome, nothing of the job outlives the test
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
    assert stopped_after < 15
    # What they left is usable: the latest checkpoint and every complete one pass their manifests (a save cut short
    # is a .partial directory, which the next run removes: test_resume_from_an_older_checkpoint).
    assert ckpt_io.read_meta(ckpt_io.latest_checkpoint(run_dir))["step"] >= 3
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        assert ckpt_io.verify_checkpoint(ckpt), ckpt


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("bad config file", marks=pytest.mark.slow),
        "bad --set value",
        pytest.param("missing config", marks=pytest.mark.slow),
    ],
)
def test_a_bad_config_shows_the_error_line_on_every_launch(tmp_path, case):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/lm-tiny.yaml").read_text().replace("hidden_size:", "hidden_sise:", 1))
    args, expected = {
        "bad config file": (["--config", str(bad)], f"error: {bad}: model.hidden_sise: unknown key"),
        "bad --set value": (["--set", "moe.num_experts=abc"], "error: --set moe.num_experts=abc: moe.num_experts:"),
        "missing config": (["--config", "/no/such.yaml"], "error: config: no config file at /no/such.yaml"),
    }[case]
    for attempt in range(LAUNCHES):
        rc, out = _run(tmp_path / f"run{attempt}", *args)
        assert rc != 0 and any(line.startswith(expected) for line in _error_lines(out)), (attempt, out[-3000:])
        assert 'Traceback (most recent call last):\n  File "' + str(REPO) not in out  # none of ours


@pytest.mark.slow
def test_the_error_line_survives_many_launches(tmp_path):
    for attempt in range(10):
        rc, out = _run(tmp_path / f"run{attempt}", "--set", "moe.num_experts=abc")
        assert rc != 0 and any(line.startswith("error: --set moe.num_experts=abc") for line in _error_lines(out)), out


def test_a_usage_error_is_printed_once_and_short(tmp_path):
    for _ in range(LAUNCHES):
        rc, out = _run(tmp_path / "run", "--bogus")
        assert rc != 0 and _error_lines(out) == [
            "error: unrecognized arguments: --bogus (launch/train.py --help lists the options)"
        ], out[-3000:]
        assert "usage:" not in out


def _damaged_copy(run: Path, tmp_path: Path, keep_manifest: bool) -> tuple[Path, Path, int]:
    """A copy of the run whose newest checkpoint has rank 1's training state cut in half; and that file's full size."""
    run_dir = Path(shutil.copytree(run, tmp_path / "run"))
    state = run_dir / "checkpoints" / "step_000008" / "train_state" / "rank00001.pt"
    full = state.stat().st_size
    state.write_bytes(state.read_bytes()[: full // 2])
    if not keep_manifest:  # as a checkpoint saved before manifests existed
        (run_dir / "checkpoints" / "step_000008" / ckpt_io.MANIFEST).unlink()
    return run_dir, state, full


def _snapshot(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"}


def test_one_damaged_rank_state_stops_every_rank_before_any_step(run, tmp_path):
    run_dir, state, full = _damaged_copy(run, tmp_path, keep_manifest=True)
    before = _snapshot(run_dir)
    for attempt in range(LAUNCHES):
        # W&B on (offline): a run that cannot start must not leave a new W&B run directory either.
        rc, out = _run(run_dir, "--resume", overrides=[*STEPS, "train.steps=12"], env={"WANDB_MODE": "offline"})
        expected = (
            f"error: corrupt checkpoint: {state} has {full // 2} bytes, manifest.json expects {full}. The newest "
            "intact checkpoint is step_000004: resume from it with --resume-from step_000004"
        )
        assert rc != 0 and _error_lines(out) in ([expected], [expected, expected]), (attempt, out[-3000:])
        assert 'Traceback (most recent call last):\n  File "' + str(REPO) not in out
    assert _snapshot(run_dir) == before and not (run_dir / "wandb").exists()


@pytest.mark.slow  # the default suite has the damaged state every rank finds (same agreement, same message)
def test_a_damaged_state_found_by_one_rank_only_stops_them_all(run, tmp_path):
    run_dir, state, _ = _damaged_copy(run, tmp_path, keep_manifest=False)
    before = _snapshot(run_dir)
    rc, out = _run(run_dir, "--resume", overrides=[*STEPS, "train.steps=12"])
    lines = _error_lines(out)
    assert rc != 0 and len(lines) in (1, 2) and len(set(lines)) == 1, out[-3000:]  # every rank says the same
    assert lines[0].startswith(f"error: rank 1: corrupt checkpoint: cannot read the training state {state} (")
    assert lines[0].endswith(
        "The newest intact checkpoint is step_000004: resume from it with --resume-from step_000004"
    )
    assert _snapshot(run_dir) == before


@pytest.mark.slow  # CI time: the damaged-state tests check the message naming --resume-from
def test_resume_from_an_older_checkpoint(run, tmp_path):
    run_dir, _, _ = _damaged_copy(run, tmp_path, keep_manifest=True)
    stale = run_dir / "checkpoints" / ".step_000012.partial"  # a save of a run killed mid-way
    (stale / "model").mkdir(parents=True)
    rc, out = _run(
        run_dir, "--resume-from", "step_000004", overrides=[*STEPS, "train.steps=10", "train.save_interval=2"]
    )
    assert rc == 0, out[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'step_000004'} (step 4)" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000010"
    assert ckpt_io.verify_checkpoint(run_dir / "checkpoints" / "step_000008")  # the damaged one was saved again
    assert sorted(_losses(run_dir)) == list(range(1, 11))
    assert not stale.exists() and not list((run_dir / "checkpoints").glob(".*"))
