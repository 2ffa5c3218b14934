"""What a writer may replace (pipeline.outputs) and the clean-up of stale temporaries (pipeline.atomic)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import (
    clean_stale_temporaries,
    staged_directory,
    temp_prefix,
    write_atomic,
)
from pipeline.outputs import OutputError, check_output, describe_path


def _dead_pid() -> int:
    """The pid of a process that has exited (and was waited for)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _temporary_of(target: Path, kind: str, pid: int, is_dir: bool = True) -> Path:
    name = temp_prefix(target, kind).replace(f"-{os.getpid()}-", f"-{pid}-") + "abc123"
    path = target.parent / name
    if is_dir:
        path.mkdir()
        (path / "weights.bin").write_bytes(b"x" * 10)
    else:
        path.write_bytes(b"partial")
    return path


def test_stale_temporaries_of_gone_writers_are_cleaned_and_nothing_else(tmp_path):
    target = tmp_path / "lm-tiny"
    target.mkdir()
    dead = _dead_pid()
    stale = _temporary_of(target, "partial", dead)
    stale_file = _temporary_of(tmp_path / "summary.json", "tmp", dead, is_dir=False)
    live = _temporary_of(target, "partial", os.getpid())  # a writer that is still running: this process
    other_target = _temporary_of(tmp_path / "lm-tiny-2", "partial", dead)  # another target's: not asked about
    legacy = tmp_path / ".lm-tiny.partial-k2j4h5g6"  # no pid in the name: cannot be proven stale
    legacy.mkdir()
    user = tmp_path / ".lm-tiny.partial-notes"
    user.write_text("mine")
    assert clean_stale_temporaries(target) == [stale]
    assert clean_stale_temporaries(tmp_path / "summary.json") == [stale_file]
    assert not stale.exists() and not stale_file.exists()
    assert live.is_dir() and other_target.is_dir() and legacy.is_dir() and user.read_text() == "mine"


def test_a_set_aside_previous_version_comes_back_when_its_writer_died_mid_swap(tmp_path):
    target = tmp_path / "export"
    old = _temporary_of(target, "replaced", _dead_pid())  # killed between its two renames: target missing
    clean_stale_temporaries(target)
    assert (target / "weights.bin").read_bytes() == b"x" * 10 and not old.exists()


def test_a_killed_writer_leaves_a_temporary_the_next_one_removes(tmp_path):
    out = tmp_path / "export"
    code = (
        "import os, sys\n"
        "from pipeline.atomic import staged_directory\n"
        f"with staged_directory({str(out)!r}) as tmp:\n"
        "    (tmp / 'half.bin').write_bytes(b'1')\n"
        "    os._exit(9)  # dies mid-write, as kill -9 would\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).parent.parent)
    (left,) = [p for p in tmp_path.iterdir()]
    assert left.name.startswith(".export.partial-")
    with staged_directory(out) as tmp:
        (tmp / "whole.bin").write_bytes(b"2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in out.iterdir()] == ["whole.bin"]


def test_write_atomic_cleans_its_own_stale_temporaries(tmp_path):
    stale = _temporary_of(tmp_path / "latest", "tmp", _dead_pid(), is_dir=False)
    write_atomic(tmp_path / "latest", "step_000010\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"] and not stale.exists()


def test_staged_directory_replaces_only_when_asked(tmp_path):
    out = tmp_path / "out"
    with staged_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError), staged_directory(out) as tmp:
        (tmp / "a").write_text("2")
    assert (out / "a").read_text() == "1"
    with staged_directory(out, replace=True) as tmp:
        (tmp / "a").write_text("3")
    assert (out / "a").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _recognise(path: Path) -> str | None:
    return "an export of test" if (path / "TAG").is_file() else None


def test_check_output_replaces_only_its_own_kind_and_never_an_input(tmp_path):
    ckpt = tmp_path / "runs" / "lm" / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    protected = {"--ckpt": ckpt}

    def check(out, force=True):
        return check_output(out, kind="export", recognise=_recognise, force=force, protected=protected)

    for out in (ckpt, ckpt / "export", tmp_path / "runs", tmp_path / "runs" / "lm"):
        with pytest.raises(OutputError, match=r"(is|is inside|contains) --ckpt .*must be somewhere else"):
            check(out)
    assert check(tmp_path / "new").replaces is None
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty").replaces is None
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"...")
    with pytest.raises(OutputError) as err:
        check(user)
    assert str(err.value) == (
        f"{user} exists and is not an export (a directory holding 1 entry (a.jpg)): choose another path; "
        "--force replaces only an export (nothing was written)"
    )
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(OutputError, match=r"is not an export \(a file of 5 bytes\)"):
        check(tmp_path / "file.txt")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "TAG").write_text("")
    with pytest.raises(OutputError, match="already holds an export of test: pass --force to replace it"):
        check(ours, force=False)
    assert check(ours).replaces == "an export of test"
    (tmp_path / "link").symlink_to(ours)
    with pytest.raises(OutputError, match="is not an export \\(a symbolic link to"):
        check(tmp_path / "link")
    assert user.is_dir() and (ours / "TAG").is_file()


def test_describe_path_says_what_is_there(tmp_path):
    for i in range(6):
        (tmp_path / f"f{i}").write_text("")
    assert describe_path(tmp_path) == "a directory holding 6 entries (f0, f1, f2, f3, ...)"
