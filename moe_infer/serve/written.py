"""The results files the serving CLI wrote (--output), remembered so that --force replaces one only while it is
provably ours: the very bytes we wrote, unchanged since. A results file carries no mark of its own (plain text, one
result per line, or JSON lines a user's tools read as they are), so the record lives with the other caches.

    describe_written(path)   "results written by launch/infer.py at 2026-12-01 20:14 UTC", or None: not ours, or
                             changed since (check_output then refuses it, --force or not)
    record_written(path)     after writing it: remember its real path, size and SHA-256

The record: $MOE_CACHE/written-outputs.json (default <repo>/.cache), real path -> {"bytes", "sha256", "written"},
written atomically; the records of files that are gone or changed are dropped at each write. A record that cannot be
read counts as empty (nothing is ours: --force refuses, the safe side); one that cannot be written leaves the file
unrecorded, so a later run refuses to replace it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from pipeline.atomic import file_sha256, write_atomic
from pipeline.cache import cache_root

RECORD_FILE = "written-outputs.json"


def describe_written(path: Path) -> str | None:
    entry = _read().get(os.path.realpath(path))
    if not _still_there(path, entry):
        return None
    return f"results written by launch/infer.py at {entry.get('written', '?')}"


def record_written(path: Path) -> None:
    records = {where: entry for where, entry in _read().items() if _still_there(Path(where), entry)}
    size, digest = _fingerprint(path)
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    records[os.path.realpath(path)] = {"bytes": size, "sha256": digest, "written": written}
    with contextlib.suppress(OSError):  # unrecorded: a later --force refuses to replace the file (the safe side)
        write_atomic(_record_file(), json.dumps(records, indent=1, sort_keys=True) + "\n")


def _record_file() -> Path:
    return cache_root() / RECORD_FILE


def _read() -> dict:
    try:
        data = json.loads(_record_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_size, file_sha256(path)


def _still_there(path: Path, entry) -> bool:
    """Whether a recorded file is still as we wrote it (its size first: a file of another size is not read)."""
    try:
        if not isinstance(entry, dict) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
        return file_sha256(path) == entry.get("sha256")
    except OSError:
        return False
