"""File integrity: writes that never leave a half-written file where a complete one was (a killed process, a full
disk), the clean-up of what a killed writer left behind, and a chunked file checksum.

The data goes to a temporary file (or directory) beside the target, is flushed to disk, then renamed over the target:
the rename is atomic on POSIX, so readers see the old content or the new one, never a mix.

Every temporary is named `.<target name>.<kind>-<host>-<pid>-<random>` (kind: tmp, partial, replaced), so a later
writer of the same target can tell that one is ours and that the process that wrote it is gone: such stale temporaries
are removed before the next write (`clean_stale_temporaries`). A `replaced` one is the previous complete version of a
directory, set aside while the new one is renamed in: if the target is missing it is put back instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

KINDS = ("tmp", "partial", "replaced")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_prefix(target: Path, kind: str) -> str:
    """The name prefix of this process's temporaries of `target` (mkstemp/mkdtemp add the random part)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f".{target.name}.{kind}-{_host()}-{os.getpid()}-"


def _owner(entry: Path, target_name: str) -> tuple[str, str, int] | None:
    """(kind, host, pid) when `entry` is a temporary of `target_name` named by `temp_prefix`, else None."""
    kinds = "|".join(KINDS)
    match = re.fullmatch(rf"\.{re.escape(target_name)}\.({kinds})-(.+)-(\d+)-[A-Za-z0-9_]+", entry.name)
    return (match[1], match[2], int(match[3])) if match else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries of `target` left by writers that are gone (ours by name, written on this host by a
    process that no longer exists). A set-aside previous version is put back when the target itself is missing.
    Returns what was removed or restored."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    done = []
    for entry in sorted(target.parent.iterdir()):
        owner = _owner(entry, target.name)
        if owner is None or owner[1] != _host() or pid_alive(owner[2]):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer cleaning at the same time
            if owner[0] == "replaced" and not (target.exists() or target.is_symlink()):
                os.rename(entry, target)
            else:
                remove_path(entry)
            done.append(entry)
    return done


def remove_path(path: Path) -> None:
    """A file, a link (not what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` when the block ends without an error, else is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path, "tmp"))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would have had.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def staged_directory(out: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; it becomes `out` when the block ends without an error, else it
    is removed. Stale temporaries of `out` from writers that are gone are cleaned first. With `replace`, an existing
    `out` (the caller has checked it is its own to replace) is set aside, and removed only once the new one is in
    place; without it, an `out` that appeared meanwhile fails the rename (FileExistsError)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out, "partial")))
    try:
        yield tmp
        _usual_modes(tmp)
        publish_directory(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the complete directory `tmp` to `out`; with `replace`, an existing `out` is swapped out first."""
    if out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir()))):
        if not replace:
            raise FileExistsError(f"{out} exists")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out, "replaced")))
        os.rename(out, old)  # onto the empty placeholder mkdtemp made; fails rather than clobber anything else
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        remove_path(old)
        return
    try:
        os.rename(tmp, out)  # onto nothing, or onto an empty directory
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):  # something appeared there meanwhile: leave it alone
            raise FileExistsError(f"{out} appeared while it was being written") from None
        raise


def _usual_modes(root: Path) -> None:
    """mkdtemp makes the directory private (0700) and some writers make files 0600: give them the usual modes."""
    umask = current_umask()
    for dirpath, _, names in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks (large wheels and shards never sit in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
