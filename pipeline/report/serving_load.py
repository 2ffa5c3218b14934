"""The report's "serving under load" section: what `python -m moe_infer.bench live` measured (live-*.json, read by
pipeline.report.sources): engine variants served over HTTP under the same arrival trace at several offered loads,
the baseline served twice (the noise control), and the server at saturation against the batch CLI on the same
prompts.

    png = latency_curves(source)        p50 / p99 TTFT and TPOT against offered load, one curve per variant
    parts = live_parts(source)          the caption, the table, the notes: pipeline.report.sections makes the blocks
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from pipeline.report.plots import _png, _style
from pipeline.report.sources import Source

PANELS = (
    ("ttft_p50_ms", "TTFT p50"),
    ("ttft_p99_ms", "TTFT p99"),
    ("tpot_p50_ms", "TPOT p50"),
    ("tpot_p99_ms", "TPOT p99"),
)


def latency_curves(source: Source) -> bytes:
    """p50 / p99 TTFT and TPOT against offered load, one curve per variant, with the min-max over rounds."""
    rows = source.data["summary"]
    rates = list(dict.fromkeys(r["rate"] for r in rows))  # in the order they were offered: lowest load first
    offered = {r["rate"]: r.get("offered_req_s") for r in rows}
    offered = {k: v if isinstance(v, int | float) else None for k, v in offered.items()}  # inf: no number
    ticks = [f"{rate}\n({offered[rate]:.1f} req/s)" if offered[rate] else f"{rate}\n(all at once)" for rate in rates]
    fig = Figure(figsize=(11, 6.5))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            mine = [(rates.index(r["rate"]), r[key]) for r in rows if r["variant"] == variant and key in r]
            if not mine:
                continue
            xs = [x + 0.04 * (i - 1) for x, _ in mine]  # a little apart, so overlapping error bars stay visible
            ys = [f["median"] for _, f in mine]
            errors = [[f["median"] - f["min"] for _, f in mine], [f["max"] - f["median"] for _, f in mine]]
            style = {**_style(i), "linestyle": "--" if variant == "baseline again" else "-"}
            ax.errorbar(xs, ys, yerr=errors, label=variant, capsize=3, **style)
        ax.set_xticks(range(len(rates)), ticks)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("offered load")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Serving under load: {source.label}")
    return _png(fig)


def _cell(figure: dict[str, float] | None) -> str | None:
    if not figure:
        return None
    return f"{figure['median']:.1f} ({figure['min']:.1f}-{figure['max']:.1f})"


@dataclass
class LiveParts:
    caption: str
    columns: list[str]
    rows: list[list[Any]]
    table_caption: str
    notes: list[str] = field(default_factory=list)


def live_parts(source: Source) -> LiveParts:
    d = source.data
    flags = d.get("settings", {})
    variants = "; ".join(f"{v['name']}: {v['flags'] or '(the baseline)'}" for v in d.get("variants", []))
    cmd = (
        f"python -m moe_infer.bench live --export {d['export']} --input {flags.get('input', 'PROMPTS')} --nproc "
        f"{d.get('ranks')} --request-rates {flags.get('request_rates')} --num-prompts {flags.get('num_prompts')} "
        f"--max-tokens {flags.get('max_tokens')} --max-concurrency {flags.get('max_concurrency')} --repeats "
        f"{flags.get('repeats')} {'--offline ' if flags.get('offline') else ''}"
        + " ".join(f'--variant {v["name"]}="{v["flags"]}"' for v in d.get("variants", [])[2:])
    )
    columns = ["variant", "rate", "out tok/s", "x baseline", "within noise", "TTFT p50 ms", "TTFT p99 ms"]
    columns += ["TPOT p50 ms", "TPOT p99 ms", "TPOT p50 x baseline", "E2E p99 ms"]
    rows = [
        [
            r["variant"], r["rate"], _cell(r.get("out_tok_s")), r.get("out_tok_s_x_baseline"),
            "yes" if r.get("out_tok_s_within_noise") else "no", _cell(r.get("ttft_p50_ms")),
            _cell(r.get("ttft_p99_ms")), _cell(r.get("tpot_p50_ms")), _cell(r.get("tpot_p99_ms")),
            r.get("tpot_p50_ms_x_baseline"), _cell(r.get("e2el_p99_ms")),
        ]
        for r in d["summary"]
    ]  # fmt: skip
    parts = LiveParts(
        f"Latency against offered load, per engine variant ({variants}); the baseline served twice (dashed: the "
        f"noise control); median over {flags.get('repeats', '?')} interleaved rounds with the min-max. Command: {cmd}",
        columns,
        rows,
        "Median (min-max) over rounds; x baseline = median / the baseline's median at that rate.",
    )
    sat = d.get("saturation") or {}
    if sat:
        parts.notes.append(
            f"At saturation (every request at once, at most {flags.get('max_concurrency')} in flight) the server "
            f"gave {sat['server_tok_s']:.0f} output tokens/s ({sat['server_tok_s_min']:.0f}-"
            f"{sat['server_tok_s_max']:.0f}, baseline and noise control), the batch CLI on the same prompts "
            f"{sat['offline_tok_s']:.0f} ({sat['offline_tok_s_min']:.0f}-{sat['offline_tok_s_max']:.0f}): "
            f"x{sat['server_over_offline']:.2f}."
        )
    same = d.get("same_texts_as_baseline") or {}
    if same:
        checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items())
        parts.notes.append(f"Texts equal to the baseline's (temperature 0): {checks}.")
    return parts
