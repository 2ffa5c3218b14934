"""Where every benchmark's figures go, written one way: a JSON file (what pipeline.report reads), a W&B run (offline
unless WANDB_MODE says otherwise, through pipeline.tracking: metrics.jsonl, <key>.table.json, summary.json) and the
table as text on stdout.

    with Results("bench-lm-tiny", settings, run_dir, "bench", json_path=run_dir / "bench.json", is_main=rank == 0) as r:
        r.row({"dynamic/prefill_ms": 3.1}, step=1)       one metrics line (and W&B log) per measured row
        r.save({"rows": [...], ...})                      the JSON file, rewritten atomically: a killed run keeps it
        r.table("bench", columns, rows, **summary)        the W&B table (+ .table.json / .csv) and summary figures
        r.print(text, out)                                the table, then where the JSON went
    Spread.of(seconds_of_each_repeat)                     a timed figure: median, min and max over the repeats

Only the main rank writes; on any other rank (and without a run directory, for the W&B part) every call does nothing,
so callers need no rank checks. Nothing here runs inside a timed region: benchmarks write between measurements.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.atomic import write_atomic
from pipeline.tracking import NamedRun, Tracker


@dataclass(frozen=True)
class Spread:
    """A timed figure over repeats: the median, the fastest and the slowest (written as x, x_min, x_max)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def per(self, amount: float) -> Spread:
        """amount / this figure (seconds into a rate): the median stays the median, the ends swap."""
        rate = lambda value: amount / value if value > 0 else 0.0  # noqa: E731
        return Spread(rate(self.median), rate(self.high), rate(self.low))

    def times(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor)

    def fields(self, name: str) -> dict[str, float]:
        return {name: self.median, f"{name}_min": self.low, f"{name}_max": self.high}

    def text(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


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
