"""The report's content, independent of its format: one Section per experiment kind, made of a few block types
that both renderers (HTML and markdown) know. Per result file: a heading, its figures (what was measured, and the
command that produced it), its table, its W&B run and its settings (collapsed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.report import plots, serving_load, shift
from pipeline.report.headline import bench_waste, ratio_cell, spread_of
from pipeline.report.sources import COMMANDS, Problem, RunInfo, Source, display_path, kind_of


@dataclass
class Heading:
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Image:
    png: bytes
    caption: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def right_aligned(self, column: int) -> bool:
        """Numbers (and blanks) align right, so their digits line up."""
        return all(isinstance(row[column], int | float) or row[column] is None for row in self.rows)


@dataclass
class Run:
    info: RunInfo


@dataclass
class Details:
    summary: str
    items: dict[str, Any]


Block = Heading | Text | Image | Table | Run | Details


@dataclass
class Section:
    kind: str
    title: str
    intro: str
    blocks: list[Block] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    not_run: str | None = None  # the command that produces this experiment, when nothing was found


def fmt(value: Any) -> str:
    """Numbers with the digits that matter at their size; None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if size >= 100 else f"{value:.2f}" if size >= 1 else f"{value:.3f}"


def _flag_command(prefix: str, flags: dict[str, Any]) -> str:
    parts = [prefix]
    for name, value in flags.items():
        if value in (None, "", [], False):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"--{name.replace('_', '-')}" + ("" if value is True else f" {text}"))
    return " ".join(parts)


def _launcher(ranks: Any) -> str:
    return f"deepspeed --num_gpus {ranks}" if isinstance(ranks, int) and ranks > 1 else "python"


def _range(row: dict, low: str, high: str) -> str | None:
    """A figure's min-max over the repeats (a layer result's own keys, a bench row's spread), as text."""
    spread = row.get("spread") or {}
    lo, hi = row.get(low, spread.get(low)), row.get(high, spread.get(high))
    return None if lo is None or hi is None else f"{fmt(lo)}-{fmt(hi)}"


# ---- one block list per result file --------------------------------------------------------------------------------


def _layer(s: Source) -> list[Block]:
    a, ranks = s.data["args"], s.data["ranks"]
    module = "--module moe_infer.bench layer" if ranks > 1 else "-m moe_infer.bench layer"
    cmd = f"{_launcher(ranks)} {module} --out {a.get('out', s.path)} --run-dir {a.get('run_dir', '-')}"
    what = (
        f"one MoE layer ({a.get('experts')} experts, top-{a.get('topk')}, D={a.get('hidden')}, F={a.get('ffn')}, "
        f"{a.get('tokens')} tokens per rank) on {ranks} rank(s); the median of {a.get('repeats')} interleaved rounds"
    )
    base = next((r for r in s.data["results"] if r["name"] == "dynamic"), None)
    rows = [
        [r["name"], r["ms"], _range(r, "ms_min", "ms_max"), r.get("tokens_per_s")]
        + [ratio_cell(spread_of(r, "ms"), spread_of(base, "ms")) if base else None]
        + [r["phases_ms"].get(p) for p in plots.PHASES]
        # The all-to-all wait (inside dispatch + combine) is measured for our own policies only.
        + [r.get("exchange_ms") if r["name"] in ("dynamic", "static") else None]
        + [r.get("activation_mb"), r.get("sent_mb"), r.get("dropped_fraction"), r.get("max_diff_vs_reference")]
        for r in s.data["results"]
    ]
    columns = ["implementation", "ms/call", "min-max", "tokens/s", "x dynamic", *plots.PHASES, "a2a wait ms"]
    columns += ["act MB", "a2a MB", "dropped", "diff vs reference"]
    return [
        Heading(f"{s.label}: {display_path(s.path)}"),
        Image(plots.layer_phases(s), f"Time per layer call split into phases, {what}. Command: {cmd}"),
        Image(plots.layer_memory(s), f"Activation memory of one call and bytes sent in its all-to-alls, {what}."),
        Table(
            columns,
            rows,
            "Times in ms, the slowest rank's: the median with the min-max of the repeats, phases of the median "
            "call; x dynamic = time / dynamic's time, its range from the spreads ('within noise' where they overlap); "
            "diff vs reference = the largest difference from the single-process reference layer.",
        ),
    ]


def _bench(s: Source) -> list[Block]:
    d = s.data
    flags = d.get("settings", {})
    keep = ("export", "mode", "policies", "max_batch", "prompt_len", "decode_steps", "run_dir")
    cmd = _flag_command(f"{_launcher(d['ranks'])} launch/infer.py", {k: flags.get(k) for k in keep})
    columns = ["policy", "batch/rank", "prefill tok/s", "min-max", "decode tok/s", "min-max", "peak MB"]
    columns += ["MoE act MB", "dropped prefill", "dropped decode"]
    rows = [
        [r["policy"], r["batch_per_rank"], r["prefill_tok_s"], _range(r, "prefill_tok_s_min", "prefill_tok_s_max")]
        + [r["decode_tok_s"], _range(r, "decode_tok_s_min", "decode_tok_s_max"), r.get("peak_mem_mb")]
        + [r.get("moe_act_mb"), r.get("dropped_prefill"), r.get("dropped_decode")]
        for r in d["rows"]
    ]
    limits = [f"{p} ran out of memory at batch {b}/rank" for p, b in d.get("limits", {}).items() if b is not None]
    stage = "prefill = the encoder, decode = the decoder" if d["task"] == "MT" else "prefill and greedy decode"
    blocks: list[Block] = [
        Heading(f"{s.label}: {display_path(s.path)}"),
        Image(
            plots.bench_curves(s),
            f"The whole {d['task']} model ({stage}) served by each gating policy on {d['ranks']} rank(s), "
            f"{d.get('device', '?')}, over batch sizes; tokens/s count all ranks. Command: {cmd}",
        ),
        Table(
            columns,
            rows,
            f"Tokens/s: the median of {d.get('settings', {}).get('repeats', 1)} interleaved repeats with their "
            "min-max, the slowest rank's time; MoE act MB = one prefill MoE layer call's activations. "
            f"{bench_waste(s)}.",
        ),
    ]
    blocks.append(Text("; ".join(limits) if limits else "No policy ran out of memory in this sweep."))
    return blocks


def _buffering(s: Source) -> list[Block]:
    d = s.data
    flags = d.get("settings", {})
    keep = ("export", "mode", "policy", "input", "slots_sweep", "evictions", "placements", "repeats", "run_dir")
    cmd = _flag_command(f"{_launcher(d.get('ranks'))} launch/infer.py", {k: flags.get(k) for k in keep})
    known = ["variant", "tok_s", "x_baseline", "expert_mb_per_rank", "memory_saving", "miss_rate", "copied_mb"]
    known += ["copy_ms", "stall_ms"]
    hidden = ["slots", "eviction", "seconds", "decoder_expert_mb", "decoder_memory_saving", "hits", "misses"]
    # Columns a newer bench adds (the placement, rank balance) are shown as they come, after the known ones.
    first = d["rows"][0]
    extra = [k for k in first if k not in known + hidden and not isinstance(first[k], dict | list)]
    columns = ["variant", "tok/s", "x baseline", "expert MB/rank", "saving", "miss rate", "copied MB", "copy ms"]
    columns += ["stall ms", *extra]
    rows = [[r.get(k) for k in known + extra] for r in d["rows"]]
    what = f"{d.get('requests', '?')} requests, {d.get('output_tokens', '?')} output tokens on {d.get('ranks', '?')}"
    blocks: list[Block] = [Heading(f"{s.label}: {display_path(s.path)}")]
    png = plots.buffering_curves(s)
    if png is not None:
        caption = (
            f"Real requests served with every expert resident in the contiguous placement (the baseline, dashed), "
            f"with K device slots per MoE layer, and under placement files ({what} rank(s), {d.get('device', '?')}); "
            f"every variant's outputs equal the baseline's. Command: {cmd}"
        )
        blocks.append(Image(png, caption))
    caption = "x baseline = tokens/s over the baseline's; saving = the baseline's expert MB / this variant's."
    blocks.append(Table(columns, rows, caption))
    return blocks


def _replay(s: Source) -> list[Block]:
    d = s.data
    cmd = _flag_command(
        "python -m moe_infer.bench replay",
        {"trace": d.get("trace"), "ranks": d.get("ranks"), "slots": d.get("slots"), "run_dir": str(s.path.parent)},
    )
    totals = [r for r in d["rows"] if r["layer"] == "total"] or d["rows"]
    ks = sorted({r["slots"] for r in totals})
    rate = {(r["policy"], r["slots"]): r["miss_rate"] for r in totals}
    policies = list(dict.fromkeys(r["policy"] for r in totals))
    rows = [[p, *(rate.get((p, k)) for k in ks)] for p in policies]
    ratio = d.get("misses_over_belady", {}).get("total", {})
    # "paper" is the paper's policy (inactive experts first, then LIFO).
    note = ", ".join(f"{p} {fmt(v) if v is not None else 'inf'}" for p, v in ratio.items())
    blocks: list[Block] = [
        Heading(f"{s.label}: {display_path(s.path)}"),
        Image(
            plots.replay_curves(s),
            f"Miss rate of each eviction policy over the device cache size K, replaying the recorded expert loads of "
            f"{d.get('trace', '?')} over {d.get('ranks', '?')} rank(s) ({d.get('placement', 'contiguous')} "
            f"placement); Belady's MIN (dashed) is the offline optimum. Command: {cmd}",
        ),
        Table(["policy", *(f"K={k}" for k in ks)], rows, "Miss rate over all layers (misses / accesses)."),
    ]
    if note:
        half = d.get("half_slots", "?")
        blocks.append(Text(f"Misses over Belady's at K = {half} (paper = the paper's LIFO policy): {note}."))
    return blocks


def _placement(s: Source) -> list[Block]:
    rows = s.data["rows"]
    ds = sorted({r["ranks"] for r in rows})
    ranks = ",".join(map(str, ds))
    cmd = f"python -m moe_infer.placement evaluate --trace TRACE --ranks {ranks} --run-dir {s.path.parent}"
    cell = {(r["layer"], r["algorithm"], r["ranks"]): r for r in rows}
    pairs = list(dict.fromkeys((r["layer"], r["algorithm"]) for r in rows))
    table = [
        [layer, algorithm, *(cell.get((layer, algorithm, d), {}).get("max_load") for d in ds)]
        + [cell.get((layer, algorithm, d), {}).get("avg_max_load") for d in ds]
        for layer, algorithm in pairs
    ]
    columns = ["layer", "algorithm", *(f"max D={d}" for d in ds), *(f"avg max D={d}" for d in ds)]
    return [
        Heading(f"{s.label}: {display_path(s.path)}"),
        Image(
            plots.placement_curves(s),
            "Largest device share of the tokens under each placement algorithm, fitted on the first half of the "
            f"trace's batches and measured on the second: Max Load (over all batches) and Avg Max Load (mean over "
            f"batches), per MoE layer, for D devices. Command: {cmd}",
        ),
        Table(columns, table, "Max Load and Avg Max Load per layer, algorithm and number of devices D."),
    ]


def _settings(s: Source) -> dict[str, Any]:
    if s.kind == "layer":
        return {"ranks": s.data["ranks"], **s.data["args"]}
    if s.kind == "placement":
        rows = s.data["rows"]
        return {
            "layers": sorted({r["layer"] for r in rows}),
            "devices D": sorted({r["ranks"] for r in rows}),
            "algorithms": list(dict.fromkeys(r["algorithm"] for r in rows)),
            "trace and flags": "recorded in the W&B run's config (the table file holds only the results)",
        }
    skip = {"rows", "columns", "task", "summary"}
    return {k: v for k, v in s.data.items() if k not in skip}


def _live(s: Source) -> list[Block]:
    parts = serving_load.live_parts(s)
    blocks: list[Block] = [
        Heading(f"{s.label}: {display_path(s.path)}"),
        Image(serving_load.latency_curves(s), parts.caption),
        Table(parts.columns, parts.rows, parts.table_caption),
    ]
    return blocks + [Text(note) for note in parts.notes]


def _shift(s: Source) -> list[Block]:
    parts = shift.shift_parts(s)
    return [
        Heading(f"{s.label}: {display_path(s.path)}"),
        Image(shift.balancedness_plot(s), parts.caption),
        Table(parts.columns, parts.rows, parts.table_caption),
    ]


BUILDERS = {
    "layer": _layer,
    "bench": _bench,
    "buffering": _buffering,
    "replay": _replay,
    "placement": _placement,
    "live": _live,
    "shift": _shift,
}
TITLES = {
    "layer": ("1. One MoE layer: every implementation", "Dynamic vs static gating and the peers on one layer."),
    "bench": ("2. Whole model: policies over batch size", "Throughput and memory of the served model."),
    "buffering": (
        "3. Serving: expert buffering and placements vs the baseline",
        "Real requests; K device expert slots per layer, or experts placed from their load history.",
    ),
    "replay": ("4. Expert cache replay: miss rate vs cache size", "Eviction policies against Belady's MIN."),
    "placement": ("5. Expert placement: load balance", "Contiguous vs history-based placements (Max Load)."),
    "live": (
        "6. Serving under load",
        "The HTTP server under the same live traffic: gating, buffering and placement variants at several offered "
        "loads, and the server against the batch CLI at saturation.",
    ),
    "shift": (
        "7. Placement under a shifting workload",
        "One workload, then another: contiguous placement, greedy fitted on the first, and online re-balancing.",
    ),
}


def build_sections(found: dict[str, list[Source]], problems: list[Problem]) -> list[Section]:
    sections = []
    for kind, builder in BUILDERS.items():
        title, intro = TITLES[kind]
        section = Section(kind, title, intro)
        section.warnings = [p.message for p in problems if kind_of(Path(p.path).name) == kind]
        for source in found[kind]:
            section.blocks += builder(source)
            if source.run is not None:
                section.blocks.append(Run(source.run))
            section.blocks.append(Details(f"settings: {display_path(source.path)}", _settings(source)))
        if not found[kind]:
            section.not_run = COMMANDS[kind]
        sections.append(section)
    return sections
