"""Find the benchmark results under the runs directories and read them into plain, checked records.

Every benchmark writes plain files next to its W&B run (pipeline.tracking): these ARE the run's contents, so the
report reads them and never the protobuf `.wandb` log. One result file per experiment run:

    layer-ep*.json           moe_infer.bench.layer          (its W&B run: the directory in its args.run_dir)
    bench.json               moe_infer.bench.model          (launch/infer.py --mode bench)
    serving.json             moe_infer.bench.serving        (launch/infer.py --mode bench-serving: expert buffering
                             and placements against the baseline); buffering.json, its earlier form, reads the same
    replay.json              moe_infer.bench.replay         (python -m moe_infer.bench replay)
    placement.table.json     moe_infer.placement evaluate   (the Tracker's table; that command writes no other file)
    live-*.json              moe_infer.bench.live           (serving under load; its section: report.serving_load)
    shift-*.json             moe_infer.bench.shift          (placement under a shifting workload: report.shift)

A file that cannot be read, or lacks a field the report needs, does not stop the report: `discover` returns it as a
problem (the path and what is wrong), the report shows it as a warning line, and `--strict` turns it into an error.
Extra keys and columns are ignored, so a bench that grows a column still reads.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

KINDS = ("layer", "bench", "buffering", "replay", "placement", "live", "shift")
PATTERNS = {
    "layer": ("layer-ep*.json",),
    "bench": ("bench.json",),
    "buffering": ("serving.json", "buffering.json"),
    "replay": ("replay.json",),
    "placement": ("placement.table.json",),
    "live": ("live-*.json",),
    "shift": ("shift-*.json", "bench-shift-*.json"),
}
# What produces each kind, for the report's "not run" lines.
COMMANDS = {
    "layer": "make bench  (python -m moe_infer.bench layer --out runs/bench/layer-ep1.json "
    "--run-dir runs/bench/layer-ep1)",
    "bench": "python launch/infer.py --export exports/lm-tiny --mode bench --run-dir runs/bench-lm-tiny",
    "buffering": "deepspeed --num_gpus 2 launch/infer.py --export exports/mt-tiny --mode bench-serving "
    "--input REQUESTS --slots-sweep 1,2,3 --evictions paper,lru --run-dir runs/bench-serving-mt-tiny",
    "replay": "python -m moe_infer.bench replay --trace runs/lm-tiny/traces/valid-step000300.npz --ranks 2 "
    "--run-dir runs/lm-tiny-replay",
    "placement": "python -m moe_infer.placement evaluate --trace runs/lm-tiny/traces/valid-step000300.npz "
    "--ranks 2,4,8,16 --run-dir runs/lm-tiny-placement",
    "live": "make bench  (python -m moe_infer.bench live --export exports/lm-tiny --input PROMPTS --offline "
    "--out runs/bench/live-lm.json)",
    "shift": "make bench  (torchrun --nproc-per-node 2 -m moe_infer.bench shift --export exports/lm-tiny-e64 "
    "--input PROMPTS --shift-to OTHER_PROMPTS --out runs/bench/shift-lm.json)",
}
SKIP_DIRS = {"wandb", "checkpoints", "__pycache__"}  # W&B's own copies and checkpoint shards hold no results


class ReportInputError(PipelineError):
    """A result file the report cannot use; the message names the file and what was expected."""


@dataclass
class RunInfo:
    """The W&B run beside a result file: its id (wandb_id.txt) and its offline run directories, oldest first."""

    run_dir: Path
    wandb_id: str | None = None
    offline_runs: list[Path] = field(default_factory=list)

    @property
    def latest(self) -> Path | None:
        return self.offline_runs[-1] if self.offline_runs else None

    def sync_command(self) -> str | None:
        if not self.offline_runs:
            return None
        pattern = f"offline-run-*-{self.wandb_id}" if self.wandb_id else "offline-run-*"
        return f"wandb sync {self.run_dir / 'wandb' / pattern}"


@dataclass
class Source:
    """One result file, read and checked. `data`: the file's JSON (tables as a list of row dicts under "rows")."""

    kind: str
    path: Path
    data: dict[str, Any]
    run: RunInfo | None
    label: str


@dataclass
class Problem:
    path: Path
    message: str


def display_path(path: Path) -> str:
    """Relative to the working directory when under it (the repository, usually), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_run_info(run_dir: Path) -> RunInfo | None:
    if not run_dir.is_dir():
        return None
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text(encoding="utf-8").strip() or None if id_file.is_file() else None
    runs = sorted(p for p in (run_dir / "wandb").glob("*run-*") if p.is_dir())  # names start with the start time
    mine = [p for p in runs if run_id and p.name.endswith(f"-{run_id}")]
    return RunInfo(run_dir, run_id, mine or runs)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ReportInputError(f"{path}: cannot be read ({err.strerror})") from None
    except ValueError as err:
        raise ReportInputError(f"{path}: not valid JSON ({err})") from None


def _need(path: Path, obj: Any, key: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ReportInputError(f"{path}: missing {where}{key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, types):  # bool is an int to isinstance: never a figure here
        raise ReportInputError(f"{path}: {where}{key!r} should be {_type_names(types)}, got {type(value).__name__}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


NUM = (int, float)
NUM_OR_NONE = (int, float, type(None))


def _check_rows(path: Path, rows: Any, fields: dict[str, Any]) -> list[dict]:
    if not isinstance(rows, list) or not rows:
        raise ReportInputError(f"{path}: 'rows' should be a non-empty list")
    for i, row in enumerate(rows):
        for key, types in fields.items():
            _need(path, row, key, types, where=f"rows[{i}].")
    return rows


def _read_layer(path: Path) -> tuple[dict, RunInfo | None, str]:
    data = _load_json(path)
    ranks = _need(path, data, "ranks", int)
    args = _need(path, data, "args", dict)
    results = _need(path, data, "results", list)
    if not results:
        raise ReportInputError(f"{path}: 'results' is empty")
    for i, r in enumerate(results):
        _need(path, r, "name", str, f"results[{i}].")
        _need(path, r, "ms", NUM, f"results[{i}].")
        for key in ("tokens_per_s", "activation_mb", "sent_mb", "dropped_fraction"):
            r.setdefault(key, None)
        r.setdefault("phases_ms", {})
    # The bench writes its JSON beside its run directory: find that directory as it was given, or by name.
    run = None
    if args.get("run_dir"):
        given = Path(args["run_dir"])
        for candidate in (path.parent / given.name, given):
            if candidate.is_dir():
                run = read_run_info(candidate)
                break
    elif (path.parent / path.stem).is_dir():
        run = read_run_info(path.parent / path.stem)
    return data, run, f"EP={ranks}"


def _read_bench(path: Path) -> tuple[dict, RunInfo | None, str]:
    data = _load_json(path)
    export = _need(path, data, "export", str)
    ranks = _need(path, data, "ranks", int)
    fields = {"policy": str, "batch_per_rank": int, "prefill_tok_s": NUM, "decode_tok_s": NUM, "peak_mem_mb": NUM}
    _check_rows(path, data.get("rows"), {**fields, "moe_act_mb": NUM})
    data.setdefault("limits", {})
    # Encoder-decoder models (MT) have encoder layers: their prefill is the encoder, their decode the decoder.
    layers = {name for row in data["rows"] for name in row.get("layers", {})}
    data["task"] = "MT" if any(name.startswith("encoder.") for name in layers) else "LM"
    return data, read_run_info(path.parent), f"{Path(export).name}, EP={ranks}"


def _read_buffering(path: Path) -> tuple[dict, RunInfo | None, str]:
    """serving.json, or the buffering.json it grew from: `x_baseline` is the ratio to the baseline (all experts
    resident, contiguous placement), which buffering.json called `x_resident` (read as x_baseline)."""
    data = _load_json(path)
    export = _need(path, data, "export", str)
    for row in data.get("rows") or []:
        if isinstance(row, dict) and "x_baseline" not in row and "x_resident" in row:
            row["x_baseline"] = row.pop("x_resident")
    fields = {"variant": str, "slots": (int, type(None)), "tok_s": NUM, "x_baseline": NUM}
    fields |= {"expert_mb_per_rank": NUM, "memory_saving": NUM, "miss_rate": NUM}
    for row in _check_rows(path, data.get("rows"), fields):
        row.setdefault("eviction", "-")
        row.setdefault("placement", "contiguous")
    return data, read_run_info(path.parent), f"{Path(export).name}, EP={data.get('ranks', '?')}"


def _table_rows(path: Path, data: Any, columns: list[str]) -> list[dict]:
    """A Tracker-style table ({"columns": [...], "rows": [[...]]}) as row dicts; `columns` must be among its own."""
    cols = _need(path, data, "columns", list)
    missing = [c for c in columns if c not in cols]
    if missing:
        raise ReportInputError(f"{path}: table lacks column(s) {missing} (has {cols})")
    rows = _need(path, data, "rows", list)
    if not rows:
        raise ReportInputError(f"{path}: the table has no rows")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, list) or len(row) != len(cols)), None)
    if bad is not None:
        raise ReportInputError(f"{path}: rows[{bad}] should be a list of {len(cols)} values like 'columns'")
    return [dict(zip(cols, row, strict=True)) for row in rows]


def _read_replay(path: Path) -> tuple[dict, RunInfo | None, str]:
    data = _load_json(path)
    data["rows"] = _table_rows(path, data, ["layer", "policy", "slots", "misses", "accesses", "miss_rate"])
    return data, read_run_info(path.parent), f"{path.parent.name}, EP={data.get('ranks', '?')}"


def _read_placement(path: Path) -> tuple[dict, RunInfo | None, str]:
    columns = ["layer", "ranks", "algorithm", "max_load", "avg_max_load"]
    data = {"rows": _table_rows(path, _load_json(path), columns)}
    return data, read_run_info(path.parent), path.parent.name


def _read_live(path: Path) -> tuple[dict, RunInfo | None, str]:
    """live-*.json (python -m moe_infer.bench live): the figures per variant and rate in "summary"; the section is
    pipeline.report.serving_load's."""
    data = _load_json(path)
    export = _need(path, data, "export", str)
    summary = _need(path, data, "summary", list)
    if not summary:
        raise ReportInputError(f"{path}: 'summary' is empty")
    for i, row in enumerate(summary):
        _need(path, row, "variant", str, f"summary[{i}].")
        _need(path, row, "rate", str, f"summary[{i}].")
        figure = _need(path, row, "out_tok_s", dict, f"summary[{i}].")
        _need(path, figure, "median", NUM, f"summary[{i}].out_tok_s.")
    data.setdefault("saturation", {})
    data.setdefault("same_texts_as_baseline", {})
    run_dir = data.get("settings", {}).get("run_dir")
    run = read_run_info(path.parent / Path(run_dir).name) if run_dir else None
    return data, run, f"{Path(export).name}, EP={data.get('ranks', '?')}"


def _read_shift(path: Path) -> tuple[dict, RunInfo | None, str]:
    """shift-*.json (python -m moe_infer.bench shift): a row per variant, each variant's balancedness over time; the
    section is pipeline.report.shift's."""
    data = _load_json(path)
    rows, variants = _need(path, data, "rows", list), _need(path, data, "variants", dict)
    _need(path, data, "report_window", int)
    if not rows or not variants:
        raise ReportInputError(f"{path}: 'rows' and 'variants' should not be empty")
    for i, row in enumerate(rows):
        for key in ("variant", "before", "after", "phase1_tok_s", "phase2_tok_s", "moves", "bytes_moved"):
            _need(path, row, key, str if key == "variant" else NUM, f"rows[{i}].")
    for name, record in variants.items():
        balancedness = _need(path, record, "balancedness", dict, f"variants.{name}.")
        _need(path, balancedness, "mean", list, f"variants.{name}.balancedness.")
        _need(path, balancedness, "shift_calls", dict, f"variants.{name}.balancedness.")
    run_dir = data.get("settings", {}).get("run_dir")
    run = read_run_info(path.parent / Path(run_dir).name) if run_dir else None
    export = data.get("settings", {}).get("export", "?")
    return data, run, f"{Path(export).name}, EP={data.get('ranks', '?')}"


READERS = {
    "layer": _read_layer,
    "bench": _read_bench,
    "buffering": _read_buffering,
    "replay": _read_replay,
    "placement": _read_placement,
    "live": _read_live,
    "shift": _read_shift,
}


def kind_of(name: str) -> str | None:
    return next((kind for kind, names in PATTERNS.items() if any(fnmatch.fnmatch(name, n) for n in names)), None)


def read_source(kind: str, path: Path) -> Source:
    data, run, label = READERS[kind](path)
    return Source(kind, path, data, run, label)


def discover(roots: list[Path]) -> tuple[dict[str, list[Source]], list[Problem]]:
    """Every result file under `roots` (recursively; W&B and checkpoint directories skipped), read and checked,
    by kind; and the files that could not be used. A root that does not exist is a problem, not an error."""
    found: dict[str, list[Source]] = {kind: [] for kind in KINDS}
    problems: list[Problem] = []
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            problems.append(Problem(root, f"{display_path(root)}: no such directory (no result files read from it)"))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                kind = kind_of(name)
                path = Path(dirpath) / name
                if kind is None or path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                try:
                    found[kind].append(read_source(kind, path))
                except ReportInputError as err:
                    problems.append(Problem(path, str(err)))
    return found, problems
