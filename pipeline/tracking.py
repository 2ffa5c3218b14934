"""Experiment tracking for every stage: a W&B run (offline by default: no network, no account) and local files.

The local files are the project's one metrics path: `pipeline.report` reads them, and they exist whatever W&B does.

    run_dir/metrics.jsonl     one JSON line per `log` call: {"step": ..., **metrics}
    run_dir/<key>.table.json  one per `log_table` (and a .table.csv beside it, for people)
    run_dir/summary.json      final figures
    run_dir/wandb_id.txt      the W&B run id, so a resumed run continues the same W&B run
    run_dir/wandb/            W&B's own offline runs; upload later with `wandb sync`

One run_dir per stage (train, convert, infer, ...): each gets its own W&B run named `<config name>-<job_type>`.
Only the main rank tracks; a Tracker on any other rank does nothing, so callers need no rank checks.

After a kill and resume, metrics.jsonl is cut back to the checkpoint's step and so reads like an uninterrupted run.
W&B's own history is not cut back (a W&B run's steps only move forward), so there the steps redone after a resume
can be dropped or shown twice; metrics.jsonl is the exact record.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.atomic import write_atomic
from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import check_output

MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ID_FILE = "wandb_id.txt"


@dataclass
class TrackingConfig:
    project: str = "moe-pipeline"
    mode: str = "offline"  # "offline" | "online" | "disabled"; the WANDB_MODE environment variable, when set, wins
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.project.strip():
            raise ConfigError("project", "must not be empty")

    def resolved_mode(self) -> str:
        mode = os.environ.get("WANDB_MODE") or self.mode
        # W&B itself also knows "dryrun" (= offline) and "run" (= online); anything else is a mistake worth naming.
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        if mode not in MODES:
            raise ConfigError("WANDB_MODE", f"expected one of {', '.join(MODES)}, got {mode!r}")
        return mode


class TrackedRun(Protocol):
    """What a Tracker reads from its run: a RunConfig, or any object with these three (the serving CLI's settings)."""

    name: str
    tracking: TrackingConfig

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class NamedRun:
    """A TrackedRun for jobs that have no RunConfig (serving, benchmarks): a name and the settings to record."""

    name: str
    settings: dict[str, Any]
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.settings)


def _plain(value: Any) -> Any:
    """Python numbers from numpy/torch scalars, so json and W&B take them as they are."""
    return value.item() if hasattr(value, "item") else value


# Everything a Tracker writes into its run directory (with write_atomic's temporaries while it writes).
TRACKER_ENTRIES = (METRICS_FILE, SUMMARY_FILE, ID_FILE, "wandb")
_TRACKER_ENTRY = re.compile(rf"(\.)?(.+\.table\.(json|csv)|{'|'.join(map(re.escape, TRACKER_ENTRIES))})(?(1)\.tmp-.+|)")


def is_tracker_entry(name: str) -> bool:
    """Whether `name`, an entry at the top of a run directory, is one a Tracker writes."""
    return bool(_TRACKER_ENTRY.fullmatch(name))


def describe_tracked_dir(path: Path, own: tuple[str, ...] = ()) -> str | None:
    """'a tracked run (metrics.jsonl, wandb, ...)' when `path` is a directory holding only what a Tracker writes plus
    the caller's `own` entries (the other files that stage writes there); None otherwise. For
    pipeline.outputs.check_output: a stage may replace (or add to) such a directory, never one holding anything else."""
    if not path.is_dir() or path.is_symlink():
        return None
    names = sorted(p.name for p in path.iterdir())
    if not names or not all(is_tracker_entry(n) or n in own for n in names):
        return None
    return f"a tracked run ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def check_run_dir(path: Path, own: tuple[str, ...] = (), protected: Mapping[str, Path] | None = None) -> None:
    """A command's --run-dir may be written: it is absent or empty, or a tracked run of that command
    (describe_tracked_dir with its `own` files), which it adds to. Anything else is refused (OutputError, from
    pipeline.outputs.check_output), and so is a path equal to, inside or containing one of `protected` (its inputs)."""
    check_output(
        path,
        kind="tracked run",
        recognise=lambda p: describe_tracked_dir(p, own),
        force=True,
        protected=protected,
        note="--run-dir adds only to a run directory of this command",
    )


def _parse_metrics(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break  # the last line of a killed run can be cut short: everything before it is whole
            raise PipelineError(f"{path}: line {number} is not a JSON record: {line[:80]!r}") from None
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, in the order logged."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PipelineError(f"no metrics at {path}: is {run_dir} the directory of a run?")
    return _parse_metrics(path)


def _table_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "table"


def read_table(run_dir: Path, key: str) -> tuple[list[str], list[list]]:
    """(columns, rows) of a table written by `Tracker.log_table`."""
    path = Path(run_dir) / f"{_table_stem(key)}.table.json"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PipelineError(f"no table {key!r} at {path} ({err})") from None
    return table["columns"], table["rows"]


class Tracker:
    """W&B + local files for one stage of one run. Use as a context manager, or call `finish()`.

    resume_step: the step of the checkpoint a run resumed from. None or 0 starts a fresh run (a new W&B run id, an
    empty metrics.jsonl, no summary.json); k > 0 continues the W&B run recorded in wandb_id.txt and keeps the
    metrics records with step <= k.
    """

    def __init__(
        self,
        cfg: TrackedRun,
        run_dir: Path,
        job_type: str,
        is_main: bool = True,
        resume_step: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.run = None
        self._metrics = None
        if not is_main:
            return
        # RunConfig gains a `tracking` section; until a config carries one, the defaults apply.
        settings: TrackingConfig = cfg.tracking
        self.mode = settings.resolved_mode()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Resuming at step 0 keeps nothing: it is a fresh run (a training loop passes its start step either way).
        resume = bool(resume_step)
        self._start_metrics(resume_step if resume else None)
        if not resume:
            (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)  # a fresh run's summary holds only its own figures
        if self.mode != "disabled":
            self.run = self._init_wandb(cfg, settings, job_type, resume)

    def _start_metrics(self, resume_step: int | None) -> None:
        """A fresh run starts an empty file; a resumed one keeps the records up to its checkpoint's step, so the
        file reads like that of an uninterrupted run (the steps after the checkpoint are about to be redone)."""
        path = self.run_dir / METRICS_FILE
        kept = []
        if resume_step is not None and path.is_file():
            kept = [r for r in _parse_metrics(path) if r.get("step", 0) <= resume_step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = path.open("a", encoding="utf-8")

    def _run_id(self, resume: bool) -> str:
        path = self.run_dir / ID_FILE
        if resume and path.is_file():
            return path.read_text().strip()
        # W&B's own id format (8 of [a-z0-9]); its generator is not public API.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        write_atomic(path, run_id + "\n")
        return run_id

    def _init_wandb(self, cfg: TrackedRun, settings: TrackingConfig, job_type: str, resume: bool):
        import wandb

        run_id = self._run_id(resume)
        try:
            return wandb.init(
                project=settings.project,
                entity=settings.entity,
                mode=self.mode,
                dir=self.run_dir,
                name=f"{cfg.name}-{job_type}",
                job_type=job_type,
                config=cfg.to_dict(),
                tags=settings.tags or None,
                id=run_id,
                resume="allow",
                reinit="create_new",  # several trackers in one process (tests, a driver running stages) coexist
                # No console capture (it would interleave W&B's copy of our output with the output), no banner,
                # no system-metrics sampler thread competing with training for the CPU cores.
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        except Exception as err:  # W&B raises many types (CommError, UsageError, timeouts); all mean the same here
            self._metrics.close()
            raise PipelineError(
                f"W&B ({self.mode}) could not start a run in {self.run_dir}: {type(err).__name__}: {err}. "
                "Set WANDB_MODE=disabled (or tracking.mode: disabled) to run without W&B; "
                "metrics.jsonl is written either way"
            ) from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        # Flushed every line, so a killed run keeps everything it logged.
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if not self.is_main:
            return
        rows = [[_plain(v) for v in row] for row in rows]
        stem = self.run_dir / _table_stem(key)
        write_atomic(stem.with_name(stem.name + ".table.json"), json.dumps({"columns": columns, "rows": rows}))
        text = io.StringIO()
        csv.writer(text).writerows([columns, *rows])
        write_atomic(stem.with_name(stem.name + ".table.csv"), text.getvalue())
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, **values) -> None:
        if not self.is_main:
            return
        values = {k: _plain(v) for k, v in values.items()}
        path = self.run_dir / SUMMARY_FILE
        merged = {**(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}), **values}
        write_atomic(path, json.dumps(merged, indent=2) + "\n")
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if not self.is_main or self._metrics is None:
            return
        self._metrics.close()
        self._metrics = None
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        if self.mode == "offline":
            # A resumed run leaves one offline directory per attempt, all with the same id: `wandb sync` uploads
            # them in order of start time into one W&B run.
            pattern = self.run_dir / "wandb" / f"offline-run-*-{run.id}"
            print(f"W&B offline run saved in {run.settings.sync_dir}\n  upload it with: wandb sync {pattern}")
        else:
            print(f"W&B run: {run.url}")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
