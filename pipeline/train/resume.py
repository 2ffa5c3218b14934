"""Where a training run starts, agreed by every rank before anything is written or any step is taken.

A check that fails on one rank only (rank 0 owns the run directory; each rank reads its own training state) would
otherwise leave the other ranks to run into the next collective and die there with a raw gloo error, after having
opened a W&B run. Every stage below ends with `agree`: all ranks learn whether any rank failed, and all of them raise
the same error, naming the cause.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from pipeline.errors import CheckpointError, CorruptCheckpointError, PipelineError
from pipeline.outputs import describe_os_error
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.run_dir import RunDirLock, choose_start, clean_stale_checkpoints

_ERROR_TYPES = {cls.__name__: cls for cls in (PipelineError, CheckpointError, CorruptCheckpointError)}


def agree(error: PipelineError | None, name_the_rank: bool = True) -> None:
    """Collective: raise on every rank if any rank failed. The message is the lowest failing rank's, prefixed with
    that rank when the ranks did not all fail alike (unless `name_the_rank` is False: a check one rank made for all)."""
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)))
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if not failed:
        return
    rank, (kind, message) = failed[0]
    alike = len(failed) == len(reports) and all(report[1] == message for _, report in failed)
    raise _ERROR_TYPES.get(kind, PipelineError)(message if alike or not name_the_rank else f"rank {rank}: {message}")


def prepare_run_dir(run_dir: Path, resume: bool, resume_from: str | None) -> tuple[Path | None, RunDirLock | None]:
    """Collective. Rank 0 checks what `run_dir` holds against what was asked, takes the run's lock and cleans what a
    killed run left; every rank gets the checkpoint to start from (None: step 0) and rank 0 the lock to hold."""
    error, start, lock = None, None, None
    if dist.get_rank() == 0:
        try:
            choose_start(run_dir, resume, resume_from)  # refuses a foreign directory before anything is created
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunDirLock(run_dir)
            clean_stale_checkpoints(run_dir)
            start = choose_start(run_dir, resume, resume_from)  # again, now that no other run can change it
        except PipelineError as err:
            error = err
        except OSError as err:
            error = PipelineError(f"cannot write the run directory {run_dir}: {describe_os_error(err)}")
        if error is not None and lock is not None:
            lock.release()
            lock = None
    agree(error, name_the_rank=False)
    chosen = [str(start) if start is not None else None]
    dist.broadcast_object_list(chosen, src=0)
    return (Path(chosen[0]) if chosen[0] is not None else None), lock


def _stage(action, run_dir: Path | None, ckpt: Path, name_the_rank: bool = True) -> None:
    """Run `action` on every rank, then agree: damage gets the newest intact checkpoint of the run named."""
    error = None
    try:
        action()
    except CorruptCheckpointError as err:
        error = ckpt_io.with_intact_hint(err, run_dir, ckpt)
    except CheckpointError as err:
        error = err
    agree(error, name_the_rank)


def check_checkpoint(ckpt: Path, cfg) -> None:
    """Collective, before any data or model is built: rank 0 checks every file of `ckpt` (the other ranks' training
    states included) against its manifest, every rank that it holds the model `cfg` describes."""

    def check() -> None:
        if dist.get_rank() == 0:
            ckpt_io.verify_checkpoint(ckpt)
        ckpt_io.check_compatible(ckpt, cfg)

    _stage(check, ckpt_io.run_dir_of(ckpt), ckpt, name_the_rank=False)


def load_checkpoint(model, optimizer, ckpt: Path) -> int:
    """Collective, after `check_checkpoint`: load the weights and this rank's training state from `ckpt`; returns its
    step. A failure on any rank stops every rank with one message naming the damaged file and the newest intact
    checkpoint of the run."""
    run_dir = ckpt_io.run_dir_of(ckpt)
    _stage(lambda: ckpt_io.load_model(model, ckpt), run_dir, ckpt)  # collective: a failed read fails it on all ranks
    steps: list[int] = []
    _stage(lambda: steps.append(ckpt_io.load_train_state(optimizer, ckpt)), run_dir, ckpt)
    return steps[0]
