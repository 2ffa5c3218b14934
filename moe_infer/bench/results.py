"""Where every benchmark's figures go, written one way: a JSON file (what pipeline.report reads), a W&B run (offline
unless WANDB_MODE says otherwise, through pipeline.tracking: metrics.jsonl, <key>.table.json, summary.json) and the
table as text on stdout.

    with Results("bench-lm-tiny", settings, run_dir, "bench", json_path=run_dir / "bench.json", is_main=rank == 0) as r:
        r.row({"dynamic/prefill_ms": 3.1}, step=1)       one metrics line (and W&B log) per measured row
        r.save({"rows": [...], ...})                      the JSON file, rewritten atomically: a killed run keeps it
        r.table("bench", columns, rows, **summary)        the W&B table (+ .table.json / .csv) and summary figures
        r.print(text, out)                                the table, then where the JSON went

Only the main rank writes; on any other rank (and without a run directory, for the W&B part) every call does nothing,
so callers need no rank checks. Nothing here runs inside a timed region: benchmarks write between measurements.

What they may write over (pipeline.outputs.check_output, before any work): `check_result_paths` lets the JSON file
replace only a previous result of the same benchmark (a JSON object with exactly its keys) and the run directory add
only to a tracked run; neither may be, lie inside or contain an input.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import IO, Any

from pipeline.atomic import write_atomic
from pipeline.outputs import check_output
from pipeline.tracking import NamedRun, Tracker, check_run_dir


def check_result_paths(
    json_path: Path | None,
    run_dir: Path | None,
    kind: str,
    keys: Collection[str],
    inputs: Mapping[str, Path | None] | None = None,
) -> None:
    """`json_path` (--out) may replace only a previous `kind` (a JSON object with exactly `keys`), `run_dir`
    (--run-dir) may add only to a tracked run, and neither may be, lie inside or contain one of `inputs` (or the
    other). Raises pipeline.outputs.OutputError naming what is there; writes nothing."""
    inputs = {name: path for name, path in (inputs or {}).items() if path is not None}

    def recognise(path: Path) -> str | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            return None
        return f"a previous {kind}" if isinstance(doc, dict) and set(doc) == set(keys) else None

    if json_path is not None:
        protected = {**inputs, **({"--run-dir": run_dir} if run_dir is not None else {})}
        check_output(json_path, kind=kind, recognise=recognise, force=True, protected=protected,
                     note=f"only a previous {kind} is replaced")  # fmt: skip
    if run_dir is not None:
        check_run_dir(run_dir, protected=inputs)


class Results:
    def __init__(
        self,
        name: str,
        settings: dict[str, Any],
        run_dir: Path | None,
        job_type: str,
        json_path: Path | None = None,
        is_main: bool = True,
    ):
        self.json_path, self.is_main = json_path, is_main
        self.tracker = None
        if run_dir is not None and is_main:
            self.tracker = Tracker(NamedRun(name, settings), run_dir, job_type)

    def row(self, metrics: dict[str, Any], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step=step)

    def save(self, doc: dict[str, Any]) -> None:
        if self.is_main and self.json_path is not None:
            write_atomic(self.json_path, json.dumps(doc, indent=1) + "\n")

    def table(self, key: str, columns: list[str], rows: list[list], **summary: Any) -> None:
        if self.tracker is not None:
            self.tracker.log_table(key, columns, rows)
            if summary:
                self.tracker.summary(**summary)

    def print(self, text: str, out: IO[str]) -> None:
        if self.is_main:
            out.write(text + "\n")
            if self.json_path is not None:
                out.write(f"results: {self.json_path}\n")
            out.flush()

    def close(self, failed: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.finish(exit_code=1 if failed else 0)
            self.tracker = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
