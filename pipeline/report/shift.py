"""The report's "placement under a shifting workload" section: what `python -m moe_infer.bench shift` measured
(shift-*.json, read by pipeline.report.sources): one workload then another, served with contiguous placement, greedy
fitted offline on the first, and online re-balancing.

    png = balancedness_plot(source)     balancedness per window of MoE calls, one curve per variant, the shift marked
    parts = shift_parts(source)         the caption, the table, the notes: pipeline.report.sections makes the blocks
"""

from __future__ import annotations

from matplotlib.figure import Figure

from pipeline.report.plots import _png, _style
from pipeline.report.serving_load import LiveParts as ShiftParts  # the same parts: caption, table, notes
from pipeline.report.sources import Source


def balancedness_plot(source: Source) -> bytes:
    window = source.data["report_window"]
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    shift = None
    for i, (variant, record) in enumerate(source.data["variants"].items()):
        mean = record["balancedness"]["mean"]
        ax.plot([(w + 1) * window for w in range(len(mean))], mean, label=variant, **_style(i))
        shift = min(record["balancedness"]["shift_calls"].values())
    ax.axvline(shift, color="grey", linestyle="--", label="shift")
    ax.set_xlabel(f"MoE calls (windows of {window})")
    ax.set_ylabel("balancedness (mean / max rank load)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Placement under a shifting workload: {source.label}")
    return _png(fig)


def _span(row: dict, key: str) -> str:
    low, high = row[f"{key}_range"]
    return f"{row[key]:.1f} ({low:.1f}-{high:.1f})"


def shift_parts(source: Source) -> ShiftParts:
    d = source.data
    flags = d.get("settings", {})
    repeats = flags.get("repeats", "?")
    cmd = (
        f"torchrun --nproc-per-node {d.get('ranks', '?')} -m moe_infer.bench shift --export {flags.get('export')} "
        f"--input {flags.get('input')} --shift-to {flags.get('shift_to')} --max-new-tokens "
        f"{flags.get('max_new_tokens')} --batch-size {flags.get('batch_size')} --rebalance-interval "
        f"{flags.get('rebalance_interval')} --rebalance-window {flags.get('rebalance_window')} --repeats {repeats}"
    )
    columns = ["variant", "balancedness before", "after", "phase 1 tok/s", "phase 2 tok/s", "re-fits", "moves"]
    columns += ["MB moved", "move s"]
    rows = [
        [r["variant"], round(r["before"], 3), round(r["after"], 3), _span(r, "phase1_tok_s"),
         _span(r, "phase2_tok_s"), r["refits"], r["moves"], round(r["bytes_moved"] / 1e6, 2),
         round(r["move_seconds"], 3)]
        for r in d["rows"]
    ]  # fmt: skip
    return ShiftParts(
        f"Balancedness (mean / max of the rank loads over a window of {d['report_window']} MoE calls, each call "
        "under the placement in force then; 1 is even; the mean over the MoE layers) while serving the first "
        "workload, then the second (dashed line: the shift). Offline: greedy fitted on the first workload's loads; "
        f"online: re-fitted while serving. Command: {cmd}",
        columns,
        rows,
        f"Balancedness: the mean over the windows before / after the shift (the window across it in neither). "
        f"Tokens/s: output tokens per second of each phase, median (min-max) of {repeats} interleaved rounds.",
    )
