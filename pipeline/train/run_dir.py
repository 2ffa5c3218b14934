"""The run directory a training run writes into: what it may hold, who writes it, which checkpoint a run starts from.

Rules (checked by rank 0 before anything is written, then agreed by every rank):
- a fresh run needs a directory that does not exist or is empty: a run that has checkpoints is continued only with
  --resume or --resume-from, and a directory holding anything that is not a run's is never written into;
- `--resume` continues from the latest checkpoint (a run without one starts from step 0 over its own files);
- `--resume-from step_N` (or a checkpoint path) continues from that checkpoint: `checkpoints/latest` then names it, and
  the newer checkpoints of the run are replaced as the run reaches their steps;
- one training run at a time per directory: rank 0 holds an exclusive lock on `<run dir>/.lock` for its lifetime (the
  kernel releases it when the process ends, however it ends). Holding it proves that any `checkpoints/.step_*.partial`
  (or set-aside `.replaced-*`) directory is a leftover of a run that is gone: it is removed (a set-aside complete
  checkpoint whose replacement never arrived is put back).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path

from pipeline.atomic import clean_stale_temporaries, remove_path
from pipeline.errors import CheckpointError, PipelineError
from pipeline.outputs import describe_path
from pipeline.tracking import is_tracker_entry
from pipeline.train import checkpoint as ckpt_io

LOCK_FILE = ".lock"
# What a training run writes at the top of its directory besides what its Tracker writes there.
RUN_ENTRIES = ("checkpoints", "traces", LOCK_FILE)


class RunDirLock:
    """An exclusive, non-blocking flock on `<run dir>/.lock`, held until `release()` or the end of the process."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise PipelineError(
                f"{run_dir} is being written by another training run ({holder}): wait for it to end, or give "
                "another --run-dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or is_tracker_entry(name)


def clean_stale_checkpoints(run_dir: Path) -> list[Path]:
    """Under the run's lock: remove partial checkpoints of a run that is gone, and put back (or remove) checkpoints set
    aside while being replaced. Returns what was cleaned."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    cleaned = []
    for entry in sorted(root.glob(".step_*.partial")):
        remove_path(entry)
        cleaned.append(entry)
    for name in sorted({m[1] for p in root.glob(".step_*.*-*") if (m := re.match(r"\.(step_\d+)\.", p.name))}):
        cleaned += clean_stale_temporaries(root / name)
    return cleaned


def choose_start(run_dir: Path, resume: bool, resume_from: str | None) -> Path | None:
    """The checkpoint to start from (None: step 0), after checking that `run_dir` may be written as asked.
    Raises PipelineError (CheckpointError for an unusable checkpoint) naming what is there and what to do."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"--run-dir {run_dir} is {describe_path(run_dir)}, not a directory")
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    foreign = [n for n in names if not is_run_entry(n)]
    if foreign:
        raise PipelineError(
            f"{run_dir} is not a run directory: it holds {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}"
            " that no training run writes; give another --run-dir (nothing there is overwritten)"
        )
    if resume_from is not None:
        return _resume_from(run_dir, resume_from)
    latest = _latest(run_dir)
    if resume:
        return latest
    if latest is not None:
        raise PipelineError(
            f"{run_dir} already holds a run (latest checkpoint {latest.name}): pass --resume to continue it, "
            "or give another --run-dir (nothing there is overwritten)"
        )
    ours = [n for n in names if n != LOCK_FILE]
    if ours:
        raise PipelineError(
            f"{run_dir} holds a run that saved no complete checkpoint ({', '.join(ours[:4])}): pass --resume to "
            "start it again from step 0 (its metrics are replaced), or give another --run-dir"
        )
    return None


def _latest(run_dir: Path) -> Path | None:
    try:
        return ckpt_io.latest_checkpoint(run_dir)
    except CheckpointError as err:
        raise ckpt_io.with_intact_hint(err, run_dir, None) from None


def _resume_from(run_dir: Path, resume_from: str) -> Path:
    """`step_N` (a checkpoint of run_dir), `N`, or a path to a checkpoint directory (of any run)."""
    named = Path(resume_from)
    if re.fullmatch(r"\d+", resume_from):
        named = run_dir / "checkpoints" / f"step_{int(resume_from):06d}"
    elif len(named.parts) == 1 and not named.exists():
        named = run_dir / "checkpoints" / resume_from
    if not (named / "meta.json").is_file() and not named.name.startswith("step_"):
        raise CheckpointError(f"--resume-from {resume_from}: {named} is not a checkpoint (checkpoints/step_N)")
    try:
        ckpt_io.read_meta(named)
    except CheckpointError as err:
        raise ckpt_io.with_intact_hint(err, ckpt_io.run_dir_of(named) or run_dir, named) from None
    return named
