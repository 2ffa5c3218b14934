"""Where and from what the report was made: the source revision, the date, the machine that wrote the report.

The revision is read from the checkout's .git files (HEAD, then the branch's ref or packed-refs) rather than by
running git: a report must not depend on git being installed, and reading never changes the checkout. The machine is
the one that wrote the report; each benchmark's own device is in its settings.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Context:
    revision: str
    date: str
    machine: str
    python: str
    torch: str

    def items(self) -> list[tuple[str, str]]:
        return [
            ("git revision", self.revision),
            ("date", self.date),
            ("machine", self.machine),
            ("python", self.python),
            ("torch", self.torch),
        ]


def _git_dir(repo: Path) -> Path | None:
    dot_git = repo / ".git"
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():  # a worktree: ".git" holds "gitdir: <path>"
        text = dot_git.read_text(encoding="utf-8").strip()
        if text.startswith("gitdir:"):
            return (repo / text.removeprefix("gitdir:").strip()).resolve()
    return None


def git_revision(repo: Path = REPO) -> str:
    """The commit HEAD points at, or "unknown" when there is no readable checkout."""
    try:
        git = _git_dir(repo)
        if git is None:
            return "unknown"
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head or "unknown"  # a detached HEAD holds the commit itself
        ref = head.removeprefix("ref:").strip()
        # A worktree keeps its own HEAD; branch refs live in the common directory.
        common = git / "commondir"
        shared = (git / common.read_text(encoding="utf-8").strip()).resolve() if common.is_file() else git
        for base in dict.fromkeys((git, shared)):
            if (base / ref).is_file():
                return (base / ref).read_text(encoding="utf-8").strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text(encoding="utf-8").splitlines():
                    sha, _, name = line.partition(" ")
                    if name == ref:
                        return sha
        return f"unknown ({ref} has no commit yet)"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def _torch() -> str:
    try:
        import torch
    except ImportError:
        return "not installed"
    if torch.cuda.is_available():
        return f"{torch.__version__}, CUDA {torch.version.cuda} ({torch.cuda.get_device_name(0)})"
    return f"{torch.__version__}, no CUDA"


def gather() -> Context:
    return Context(
        revision=git_revision(),
        date=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        machine=f"{platform.platform()}, {os.cpu_count()} CPU(s)",
        python=platform.python_version(),
        torch=_torch(),
    )
