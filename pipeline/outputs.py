"""What a command may write over: the one rule every writer of user-visible outputs follows.

    decision = check_output(out, kind="export", recognise=describe_export, force=args.force,
                            protected={"--ckpt": ckpt}, flag="--force")

- `out` equal to, inside, or containing a protected path (the input being read, a run directory) is refused, with or
  without --force.
- Nothing there (or an empty directory): write it.
- Something the writer recognises as its own kind of output (`recognise(path)` returns a description, e.g. "an export
  of lm-tiny at step 300"): replaced only with the flag, else refused with a message naming what is there.
- Anything else is refused, flag or not, with a message saying what is there; the message never suggests deleting it.

`recognise` must only say yes to what is provably that writer's output (a format tag in a file the writer writes,
and nothing in the directory the writer would not have written), since replacing means deleting.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


class OutputError(PipelineError):
    """An output path that must not be written: it is an input, or holds something that is not ours to replace."""


@dataclass(frozen=True)
class OutputDecision:
    path: Path
    replaces: str | None  # the description of our output being replaced; None when nothing is there


def describe_path(path: Path, limit: int = 4) -> str:
    """What is at `path`, in words: 'a file of 12 bytes', 'a directory holding 3 entries (a, b, c)', ..."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if path.is_dir():
        try:
            names = sorted(p.name for p in path.iterdir())
        except OSError as err:
            return f"a directory that cannot be listed ({err.strerror})"
        if not names:
            return "an empty directory"
        shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
        return f"a directory holding {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"
    if path.is_file():
        return f"a file of {path.stat().st_size} bytes"
    return "something that is neither a file nor a directory"


def overlap(out: Path, protected: Path) -> str | None:
    """How `out` overlaps `protected` ('is', 'is inside', 'contains'), comparing real paths; None when apart."""
    a, b = Path(os.path.realpath(out)), Path(os.path.realpath(protected))
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "is inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_output(
    out: str | Path,
    *,
    kind: str,
    recognise: Callable[[Path], str | None],
    force: bool,
    protected: Mapping[str, str | Path] | None = None,
    flag: str = "--force",
    note: str | None = None,
) -> OutputDecision:
    """Decide whether `out` may be written (module docstring); raise OutputError when it may not. `note` replaces
    "--force replaces only <kind>" at the end of the refusal of something that is not ours."""
    out = Path(out)
    for name, path in (protected or {}).items():
        how = overlap(out, Path(path))
        if how:
            raise OutputError(f"{out} {how} {name} {path}: the output must be somewhere else (nothing was written)")
    if not (out.exists() or out.is_symlink()):
        return OutputDecision(out, None)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return OutputDecision(out, None)
    ours = None if out.is_symlink() else recognise(out)
    if ours is None:
        raise OutputError(
            f"{out} exists and is not {_article(kind)} ({describe_path(out)}): choose another path; "
            f"{note or f'{flag} replaces only {_article(kind)}'} (nothing was written)"
        )
    if not force:
        raise OutputError(f"{out} already holds {ours}: pass {flag} to replace it (nothing was written)")
    return OutputDecision(out, ours)


def _article(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: 'Read-only file system [EROFS]: /path', with a hint for a mount point (EBUSY)."""
    code = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else "?"
    where = f": {err.filename}" if err.filename else ""
    hint = " (a mount point cannot be renamed or replaced: write inside it instead)" if err.errno == errno.EBUSY else ""
    return f"{err.strerror or err} [{code}]{where}{hint}"
