"""The report's figures, each drawn from one result file and returned as PNG bytes.

matplotlib's object API (Figure + the Agg canvas) rather than pyplot: no global figure state and no GUI backend,
so the report draws the same on a headless server, in tests and in a notebook.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from pipeline.report.sources import Source

PHASES = ("gate", "dispatch", "experts", "combine")
PHASE_COLORS = {"gate": "#4e79a7", "dispatch": "#f28e2b", "experts": "#59a14f", "combine": "#e15759"}
SLOW_FACTOR = 10  # an implementation this many times slower than the fastest gets its own axis
DPI = 110
# Series often coincide (two eviction policies with the same misses, greedy and greedy+replicas): a different
# marker and a slightly smaller one each time keeps the hidden ones visible under the top line.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _style(i: int) -> dict:
    return {"marker": MARKERS[i % len(MARKERS)], "markersize": max(3, 8 - i), "linewidth": max(1.0, 2.2 - 0.3 * i)}


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _log_if_wide(ax, values: Iterable[float], axis: str = "y", spread: float = 20.0) -> None:
    """Log scale when the positive values span more than `spread`x: a linear axis would flatten the small ones."""
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > spread:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _batch_axis(ax, xs: Iterable[int], label: str) -> None:
    """Powers of two on a log2 axis, labelled as plain integers."""
    xs = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def _slots_axis(ax, ks: list[int], label: str) -> None:
    """Cache sizes: linear when few and close, log2 when they span a wide range (1, 2, 4, ... 32 would crowd)."""
    if max(ks) / min(ks) > 8:
        _batch_axis(ax, ks, label)
    else:
        ax.set_xticks(sorted(set(ks)))
        ax.set_xlabel(label)


def layer_phases(source: Source) -> bytes:
    """Stacked phase times per implementation; the slow ones (static) on a second axis with its own scale."""
    results = source.data["results"]
    fastest = min(r["ms"] for r in results)
    fast = [r for r in results if r["ms"] <= SLOW_FACTOR * fastest]
    slow = [r for r in results if r["ms"] > SLOW_FACTOR * fastest]
    widths = [3, 1.3] if slow else [1]
    fig = Figure(figsize=(11, 0.45 * len(results) + 1.6))
    axes = fig.subplots(1, len(widths), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    rows = max(len(fast), len(slow))
    for ax, group in zip(axes, (fast, slow), strict=False):
        offset = (rows - len(group)) / 2  # the same bar thickness on both axes, the short group centred
        for i, r in enumerate(group[::-1]):  # first result on top
            y, left = offset + i, 0.0
            for phase in PHASES:
                value = r["phases_ms"].get(phase) or 0.0
                ax.barh(y, value, left=left, color=PHASE_COLORS[phase], label=phase)
                left += value
            if not r["phases_ms"]:  # the floors: a total, no phase split
                ax.barh(y, r["ms"], color="#bab0ac", hatch="//", label="no phase split")
            ax.text(r["ms"], y, f" {r['ms']:.0f} ms", va="center", fontsize=8)
        ax.set_yticks([offset + i for i in range(len(group))], [r["name"] for r in group[::-1]])
        ax.set_ylim(-0.6, rows - 0.4)
        ax.set_xlim(0, max(r["ms"] for r in group) * 1.3)
        ax.set_xlabel("ms per layer call")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_title(f"MoE layer, {source.label}: time per phase")
    if slow:
        axes[1].set_title(f"> {SLOW_FACTOR}x slower: own scale")
    legend: dict[str, object] = {}  # one entry per label over both axes
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    axes[0].legend(legend.values(), legend.keys(), loc="lower right", fontsize=8)
    return _png(fig)


def layer_memory(source: Source) -> bytes:
    """Activation memory and all-to-all volume per implementation, log scale (static is orders larger)."""
    results = [r for r in source.data["results"] if r["phases_ms"]]  # the floors allocate and send nothing
    fig = Figure(figsize=(11, 0.4 * len(results) + 1.6))
    axes = fig.subplots(1, 2)
    panels = (("activation_mb", "activation memory"), ("sent_mb", "all-to-all sent"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        names = [r["name"] for r in results][::-1]
        values = [r.get(key) or 0.0 for r in results][::-1]
        ax.barh(range(len(names)), values, color="#76b7b2")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), names)
        if not any(v > 0 for v in values):
            ax.clear()
            ax.set_axis_off()
            why = " (one rank: nothing crosses ranks)" if key == "sent_mb" and source.data["ranks"] == 1 else ""
            ax.text(0.5, 0.5, f"{title}: zero{why}", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xscale("log")
        ax.set_xlim(min(v for v in values if v > 0) / 2, max(values) * 6)
        ax.set_xlabel("MB per layer call (log scale)")
        ax.set_title(f"{source.label}: {title}")
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def bench_curves(source: Source) -> bytes:
    """Per policy over batch size: prefill and decode tokens/s (the median, the repeats' min-max as a band), peak
    memory, the MoE layer's activation memory."""
    rows = source.data["rows"]
    mt = source.data["task"] == "MT"
    panels = [
        ("prefill_tok_s", "prefill (encoder) tokens/s" if mt else "prefill tokens/s"),
        ("decode_tok_s", "decode (decoder) tokens/s" if mt else "decode tokens/s"),
        ("peak_mem_mb", f"peak memory MB ({source.data.get('memory', 'peak')})"),
        ("moe_act_mb", "MoE layer activation MB"),
    ]
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2).ravel()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, policy in enumerate(policies):
            mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["batch_per_rank"])
            batches = [r["batch_per_rank"] for r in mine]
            line = ax.plot(batches, [r[key] for r in mine], label=policy, **_style(i))[0]
            spreads = [r.get("spread") or {} for r in mine]
            if all(f"{key}_min" in s for s in spreads):  # the repeats' min-max as a band
                low, high = [s[f"{key}_min"] for s in spreads], [s[f"{key}_max"] for s in spreads]
                ax.fill_between(batches, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        _batch_axis(ax, (r["batch_per_rank"] for r in rows), "batch per rank")
        _log_if_wide(ax, (r[key] for r in rows))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Model bench: {source.label}")
    return _png(fig)


def baseline_row(rows: list[dict]) -> dict | None:
    """Every expert resident in the contiguous placement: what buffering and placements are measured against."""
    return next((r for r in rows if r["slots"] is None and r["placement"] == "contiguous"), None)


def buffering_curves(source: Source) -> bytes | None:
    """Per eviction policy over device slots K: throughput over the baseline, device expert memory, miss rate;
    and each placement variant's throughput over the baseline. None when the file has neither."""
    rows = source.data["rows"]
    baseline = baseline_row(rows)
    buffered = [r for r in rows if r["slots"] is not None]
    placed = [r for r in rows if r["slots"] is None and r is not baseline]
    panels = [("x_baseline", "throughput / baseline"), ("expert_mb_per_rank", "device expert MB per rank")]
    panels = [*panels, ("miss_rate", "miss rate")] if buffered else []
    if not panels and not placed:
        return None
    count = len(panels) + bool(placed)
    fig = Figure(figsize=(11 if count > 2 else 8, 3.6))
    axes = fig.subplots(1, count, squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=False):
        for i, eviction in enumerate(dict.fromkeys(r["eviction"] for r in buffered)):
            mine = sorted((r["slots"], r[key]) for r in buffered if r["eviction"] == eviction)
            ax.plot(*zip(*mine, strict=True), label=eviction, **_style(i))
        if baseline is not None and key != "miss_rate":
            ax.axhline(baseline[key], color="black", linestyle="--", linewidth=1, label="all resident")
        _slots_axis(ax, [r["slots"] for r in buffered], "device slots K per MoE layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if panels:
        axes[0].legend(fontsize=8)
    if placed:
        ax = axes[-1]
        ax.barh(range(len(placed)), [r["x_baseline"] for r in placed], color="#76b7b2")
        ax.set_yticks(range(len(placed)), [r["variant"] for r in placed])
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("throughput / baseline (contiguous)")
        ax.set_title("placements")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Serving: {source.label}")
    return _png(fig)


def replay_curves(source: Source) -> bytes:
    """Miss rate over cache size per policy and layer; Belady's MIN (the offline optimum) dashed, the floor."""
    rows = source.data["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cols = min(3, len(layers))
    nrows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(11, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers, strict=False):
        mine = [r for r in rows if r["layer"] == layer]
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in mine)):
            points = sorted((r["slots"], r["miss_rate"]) for r in mine if r["policy"] == policy)
            style = {"color": "black", "linestyle": "--", "linewidth": 1.5} if policy == "belady" else _style(i)
            ax.plot(*zip(*points, strict=True), label=policy, **style)
        _slots_axis(ax, [r["slots"] for r in mine], "device slots K per rank")
        ax.set_ylabel("miss rate")
        ax.set_ylim(0, 1.02)
        ax.set_title(layer)
        ax.grid(alpha=0.3)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Cache replay: {source.label}")
    return _png(fig)


def placement_curves(source: Source) -> bytes:
    """Per layer: Avg Max Load and Max Load over the number of devices D, one line per algorithm."""
    rows = source.data["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig = Figure(figsize=(11, 3.3 * len(layers)))
    axes = fig.subplots(len(layers), 2, squeeze=False)
    for (ax_avg, ax_max), layer in zip(axes, layers, strict=True):
        mine = [r for r in rows if r["layer"] == layer]
        for ax, key, title in ((ax_avg, "avg_max_load", "Avg Max Load"), (ax_max, "max_load", "Max Load")):
            for i, algorithm in enumerate(dict.fromkeys(r["algorithm"] for r in mine)):
                points = sorted((r["ranks"], r[key]) for r in mine if r["algorithm"] == algorithm)
                style = _style(i) | ({"color": "black", "linestyle": "--"} if algorithm == "contiguous" else {})
                ax.plot(*zip(*points, strict=True), label=algorithm, **style)
            _batch_axis(ax, (r["ranks"] for r in mine), "devices D")
            ax.set_title(f"{layer}: {title}")
            ax.set_ylabel("share of tokens on the busiest device")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Placement: {source.label} (fit on the first half of the trace, measured on the second)")
    return _png(fig)
