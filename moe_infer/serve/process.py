"""One rank of a command that a launcher (torchrun, deepspeed) started, or a process of its own: where its results
go, how it reports errors, and how it ends. The serving CLI and the benchmarks that serve an export share it.

    with launched(args.quiet) as command:
        job = prepare(args)           every check, identical on every rank, before any collective
        command.checked()             from here an error may be one rank's own
        ...                           command.out: stdout for results only
    return command.status

Errors: a PipelineError met before `checked()` is met by every rank alike: rank 0 prints it at once, any other rank
after a short wait unless the launcher has stopped it by then (`say_once`), so it is shown at least once, usually
once, whichever rank exits first. After `checked()`, each rank that meets one prints it with its rank. Exit status 2
for bad input (requests, flag values: RequestError, ConfigError, OutputError), 1 for any other known problem (a
missing or broken export). An unexpected exception prints its traceback with the rank and exits 1; a collective that
failed because another rank stopped (or --timeout passed) only says so, since the rank that caused it prints the
cause. The process group is destroyed at the end either way. A usage error (ArgumentParser) is one short line, shown
once the same way. Every message is written in one write, newline included: the deepspeed launcher runs ranks with
`python -u`, where print()'s separate newline let two ranks' messages run together on one line.

Everything libraries print (DeepSpeed's logs, W&B's notes) goes to stderr: stdout carries the results only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import OutputError

# How long a rank other than 0 waits before printing an error every rank met alike: long enough for rank 0 to print
# and exit and for the launcher to stop the others (torchrun and deepspeed do at once), so the line is usually shown
# once; a rank still running after it prints the line itself (rank 0 was slower, or is gone).
QUIET_RANK_DELAY_S = 3.0


def say(line: str) -> None:
    """`line` on stderr in one write, its newline included, so that two ranks' lines never run together."""
    sys.stderr.write(line if line.endswith("\n") else line + "\n")
    sys.stderr.flush()


def say_once(line: str, rank: int, world: int) -> None:
    """A message every rank has alike: shown at least once whichever rank the launcher sees exit first, and usually
    once (module docstring). Rank 0 alone printing it lost it whenever another rank exited first: the launcher then
    stopped rank 0 before it printed."""
    if rank != 0 and world > 1:
        time.sleep(QUIET_RANK_DELAY_S)
    say(line)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error in one short line (not the usage block), shown once per job (`say_once`): every
    rank parses the same arguments."""

    def error(self, message: str):
        say_once(f"error: {message} ({self.prog} --help lists the options)", *launcher_rank())
        sys.exit(2)


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher set them, before torch.distributed exists ((0, 1) without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1  # init_distributed names the bad variable later


@contextlib.contextmanager
def results_stdout() -> Iterator[IO[str]]:
    """A text stream on the process's stdout, while file descriptor 1 itself points at stderr: whatever the libraries
    print (DeepSpeed logs to stdout, W&B prints its notes there, C++ code writes to fd 1) lands on stderr, and stdout
    carries the results alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    results = os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield results
    finally:
        results.flush()
        results.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def configure_process(quiet: bool) -> None:
    from pipeline.platform import quiet_known_warnings

    quiet_known_warnings()  # (threads per rank: Engine.start decides)
    if quiet:
        import logging

        os.environ.setdefault("WANDB_SILENT", "true")
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def progress(quiet: bool, rank: int, message: str) -> None:
    """A progress line on stderr, from rank 0, unless --quiet."""
    if not quiet and rank == 0:
        say(message)


@dataclass
class Command:
    rank: int
    world: int
    out: IO[str]
    status: int = 0
    same_everywhere: bool = True  # errors so far are met by every rank alike (checks before any collective)

    def checked(self) -> None:
        self.same_everywhere = False


@contextlib.contextmanager
def launched(quiet: bool) -> Iterator[Command]:
    """The command's rank: results on `command.out`, its errors reported (see the module docstring) into
    `command.status`, the process group destroyed at the end."""
    rank, world = launcher_rank()
    with results_stdout() as out:
        command = Command(rank, world, out)
        try:
            configure_process(quiet)
            yield command
        except PipelineError as err:
            command.status = _fail(err, rank, world, command.same_everywhere)
        except Exception as err:  # a bug, not a user error: the traceback, with the rank that met it
            command.status = _crash(err, rank, world)
        finally:
            _finish_distributed()


def _fail(err: PipelineError, rank: int, world: int, same_everywhere: bool) -> int:
    """One clear message: an error every rank meets alike without the rank (`say_once`), any other with it."""
    from moe_infer.runtime.generate import RequestError

    if same_everywhere:
        say_once(f"error: {err}", rank, world)
    else:
        say(f"error{f' (rank {rank} of {world})' if world > 1 else ''}: {err}")
    return 2 if isinstance(err, RequestError | ConfigError | OutputError) else 1


def is_collective_failure(err: BaseException, world: int) -> bool:
    """A collective that failed because a peer went away or --timeout passed: a consequence, not the cause."""
    import torch.distributed as dist

    if world == 1:
        return False
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")
    return isinstance(err, RuntimeError) and any(s in text for s in peer_gone)


def _crash(err: BaseException, rank: int, world: int) -> int:
    if is_collective_failure(err, world):
        # The rank that caused it prints its own traceback; this one only says why it stopped.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        say(f"error (rank {rank} of {world}): a collective failed: another rank stopped, or --timeout passed ({first})")
        return 1
    say(f"rank {rank} of {world}: unexpected error\n{traceback.format_exc()}")
    return 1


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
