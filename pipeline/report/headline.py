"""The headline table: each ratio the paper reports, next to the one measured here and where it came from.

Paper numbers are from PAPER.md (Huang et al., arXiv 2303.06182, V100/A5000 GPUs, fairseq models). One row per
(claim, result file); a claim with no result file gets one row saying "not measured" and the command to run.
How each measured cell is derived:
    throughput   static ms / dynamic ms (the layer bench), or dynamic tok/s / static tok/s at the largest batch
                 size both policies ran (the model bench: prefill, and decode; for MT prefill is the encoder); the
                 ratio of the medians, its range from the two spreads [min-max], "within noise" where they overlap,
                 and the waste factor E*C/k it was measured at (flagged when it is not the paper's)
    peers        dynamic vs megatron-core and DeepSpeed, and the MoE model's time over its FLOP-equivalent dense
                 model's, whole model, at the largest batch both ran (beyond the paper); and our engine vs
                 transformers' own MoE model on the same weights, one process (the model bench's transformers policy)
    activation   static MB / dynamic MB of one MoE layer call (layer bench), or of the first prefill MoE layer at
                 batch 8 per rank (the paper's batch) when both ran it, else the largest common batch
    largest batch  from the model bench's out-of-memory limits
    buffering    the largest device-memory saving; and the throughput over the baseline (every expert resident)
                 at the largest K that still saves >= 1.47x, the best eviction policy there
    replay       LIFO's (the paper's policy) misses over Belady's at K = L/2, all layers
    placement    contiguous vs greedy Max Load at the (layer, D) where greedy lowers it most; and the serving
                 bench's placement variants, tokens/s over the contiguous baseline
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.report.sources import COMMANDS, Source, display_path

PAPER_BUFFER_SAVING = 1.47
PAPER_WASTE = {"LM": 12.8, "MT": 64.0}  # E*C/k of the paper's models (PAPER.md)
DENSE = "dense-equivalent"


@dataclass
class Headline:
    claim: str
    paper: str
    measured: str
    source: str  # file and setting, or the command that would measure it


def _by_name(source: Source) -> dict[str, dict]:
    return {r["name"]: r for r in source.data["results"]}


def spread_of(row: dict, key: str) -> tuple[float, float, float]:
    """(median, min, max) of a timed figure: a layer result's ms_min/ms_max, a bench row's spread; a file written
    before spreads were recorded gives the figure alone as its own range."""
    value = row[key]
    spread = row.get("spread") or {}
    low = row.get(f"{key}_min", spread.get(f"{key}_min", value))
    high = row.get(f"{key}_max", spread.get(f"{key}_max", value))
    return value, low, high


def ratio_cell(top: tuple[float, float, float], bottom: tuple[float, float, float]) -> str:
    """top / bottom of two (median, min, max) figures: the ratio of the medians, its range from the spreads, and
    "within noise" when the two spreads overlap."""
    (t, t_low, t_high), (b, b_low, b_high) = top, bottom
    if not b or not b_low:
        return "inf"
    cell = f"{t / b:.2f}x"
    if (t_low, t_high) != (t, t) or (b_low, b_high) != (b, b):
        cell += f" [{t_low / b_high:.2f}-{t_high / b_low:.2f}]"
        if t_low <= b_high and b_low <= t_high:
            cell += " within noise"
    return cell


def _waste(experts: Any, fraction: Any, topk: Any, paper: float | None) -> str:
    """The waste factor E*C/k a static-vs-dynamic ratio was measured at, flagged when it is not the paper's."""
    try:
        waste = float(experts) * float(fraction) / float(topk)
    except (TypeError, ValueError):
        return "waste factor unknown"
    text = f"waste factor E*C/k = {waste:g}"
    if paper is not None and abs(waste - paper) > 0.05 * paper:
        text += f" (NOT the paper's {paper:g}: this ratio does not test the paper's claim)"
    return text


def _layer_setting(source: Source) -> str:
    a = source.data["args"]
    return (
        f"{display_path(source.path)}: EP={source.data['ranks']}, {a.get('tokens', '?')} tokens/rank, "
        f"E={a.get('experts', '?')}, top-{a.get('topk', '?')}, C={a.get('capacity_fraction', '?')}, "
        f"{_waste(a.get('experts'), a.get('capacity_fraction'), a.get('topk'), PAPER_WASTE['LM'])}"
    )


def bench_waste(source: Source) -> str:
    moe = source.data.get("moe") or {}
    return _waste(
        moe.get("num_experts"), moe.get("capacity_fraction"), moe.get("topk"), PAPER_WASTE[source.data["task"]]
    )


def _common_batch(
    source: Source, prefer: int | None = None, other: str = "static", mine: str = "dynamic"
) -> tuple[dict, dict] | None:
    """(`mine`'s row, `other`'s row) at batch `prefer` when both ran it, else at the largest batch both ran."""
    rows = {(r["policy"], r["batch_per_rank"]): r for r in source.data["rows"]}
    common = sorted(b for p, b in rows if p == mine and (other, b) in rows)
    if not common:
        return None
    batch = prefer if prefer in common else common[-1]
    return rows[mine, batch], rows[other, batch]


def _missing(claim: str, paper: str, kind: str) -> Headline:
    return Headline(claim, paper, "not measured", f"run: {COMMANDS[kind]}")


def throughput(found: dict[str, list[Source]]) -> list[Headline]:
    claim, paper = "Dynamic vs static gating: throughput", "6.21x LM, 5.75x MT encoder, 2.58x MT decoder"
    out = []
    for s in found["layer"]:
        r = _by_name(s)
        if "dynamic" in r and "static" in r:
            cell = ratio_cell(spread_of(r["static"], "ms"), spread_of(r["dynamic"], "ms"))
            out.append(Headline(f"{claim} (one LM-shaped MoE layer)", "6.21x (LM)", cell, _layer_setting(s)))
    for s in found["bench"]:
        pair = _common_batch(s)
        if pair is None:
            continue
        dyn, sta = pair
        stages = [("prefill", "5.75x (MT encoder)"), ("decode", "2.58x (MT decoder)")]
        if s.data["task"] == "LM":
            stages = [("prefill", "6.21x (LM)"), ("decode", "6.21x (LM)")]
        for stage, paper_cell in stages:
            key = f"{stage}_tok_s"
            cell = ratio_cell(spread_of(dyn, key), spread_of(sta, key))
            where = (
                f"{display_path(s.path)}: {s.label}, batch {dyn['batch_per_rank']}/rank, {stage} tokens/s, "
                f"{bench_waste(s)}"
            )
            out.append(Headline(f"{claim} ({s.data['task']} model, {stage})", paper_cell, cell, where))
    if not any(_common_batch(s) for s in found["bench"]):
        out.append(_missing(f"{claim} (whole model)", paper, "bench"))
    if not found["layer"]:
        out.insert(0, _missing(f"{claim} (one MoE layer)", "6.21x (LM)", "layer"))
    return out


def peers(found: dict[str, list[Source]]) -> list[Headline]:
    """Beyond the paper: dynamic against megatron-core's and DeepSpeed's MoE layers and the FLOP-equivalent dense
    model, whole model, at the largest batch each ran (the paper's characterisation: MoE 15x slower than dense for
    the LM, 22x MT encoder, 3x MT decoder)."""
    out = []
    for s in found["bench"]:
        for other, paper in (("megatron", "-"), ("deepspeed", "-"), (DENSE, "15x LM, 22x MT enc, 3x MT dec")):
            pair = _common_batch(s, other=other)
            if pair is None:
                continue
            dyn, peer = pair
            for stage in ("prefill", "decode"):
                key = f"{stage}_tok_s"
                if other == DENSE:  # how much slower the MoE model is than its dense equivalent: time over time
                    claim = f"MoE (dynamic) time / FLOP-equivalent dense time ({s.data['task']}, {stage})"
                    cell = ratio_cell(spread_of(peer, key), spread_of(dyn, key))
                else:
                    claim = f"Dynamic vs {other} throughput ({s.data['task']} model, {stage})"
                    cell = ratio_cell(spread_of(dyn, key), spread_of(peer, key))
                where = f"{display_path(s.path)}: {s.label}, batch {dyn['batch_per_rank']}/rank, {bench_waste(s)}"
                out.append(Headline(claim, paper, cell, where))
    return out + transformers(found)


def transformers(found: dict[str, list[Source]]) -> list[Headline]:
    """Beyond the paper: our engine against what a user would pick instead, transformers' own MoE model on the same
    weights in one process (moe_infer.bench.hf_baseline), each experts implementation that ran, largest batch."""
    out = []
    for s in found["bench"]:
        variants = (s.data.get("transformers") or {}).get("variants", [])
        for variant in variants[1:]:  # the first is our engine
            pair = _common_batch(s, other=variant, mine=variants[0])
            if pair is None:
                continue
            ours, theirs = pair
            for stage in ("prefill", "decode"):
                key = f"{stage}_tok_s"
                claim = f"Our engine vs {variant} throughput ({s.data['task']} model, {stage})"
                where = (
                    f"{display_path(s.path)}: {Path(s.data['export']).name}, one process, same weights, batch "
                    f"{ours['batch_per_rank']}, {(s.data.get('moe') or {}).get('num_experts')} experts"
                )
                out.append(Headline(claim, "-", ratio_cell(spread_of(ours, key), spread_of(theirs, key)), where))
    return out


def activation(found: dict[str, list[Source]]) -> list[Headline]:
    claim = "Dynamic vs static gating: activation memory"
    paper = "LM 6.29 -> 1.28 GB (4.9x), MT 1.89 -> 1.05 GB (1.8x), batch 8"
    out = []
    for s in found["layer"]:
        r = _by_name(s)
        dyn, sta = r.get("dynamic", {}).get("activation_mb"), r.get("static", {}).get("activation_mb")
        if dyn and sta:
            cell = f"{sta:.1f} -> {dyn:.1f} MB ({sta / dyn:.1f}x)"
            out.append(Headline(f"{claim} (one MoE layer)", "4.9x (LM)", cell, _layer_setting(s)))
    for s in found["bench"]:
        pair = _common_batch(s, prefer=8)
        if pair is None or not pair[0]["moe_act_mb"]:
            continue
        dyn, sta = pair[0]["moe_act_mb"], pair[1]["moe_act_mb"]
        cell = f"{sta:.2f} -> {dyn:.2f} MB ({sta / dyn:.1f}x)"
        where = f"{display_path(s.path)}: {s.label}, batch {pair[0]['batch_per_rank']}/rank, first prefill MoE layer"
        task_paper = "4.9x (LM)" if s.data["task"] == "LM" else "1.8x (MT)"
        out.append(Headline(f"{claim} ({s.data['task']} model)", task_paper, cell, where))
    if not any(_common_batch(s) for s in found["bench"]):
        out.append(_missing(f"{claim} (whole model)", paper, "bench"))
    if not found["layer"]:
        out.insert(0, _missing(f"{claim} (one MoE layer)", "4.9x (LM)", "layer"))
    return out


def largest_batch(found: dict[str, list[Source]]) -> list[Headline]:
    claim, paper = "Largest batch that fits, dynamic vs static", "8x LM, 2x MT"
    out = []
    for s in found["bench"]:
        limits = s.data["limits"]
        if "dynamic" not in limits or "static" not in limits:
            continue
        fits = {
            p: max((r["batch_per_rank"] for r in s.data["rows"] if r["policy"] == p), default=0)
            for p in ("dynamic", "static")
        }
        if limits["static"] is None:
            cell = f"not reached: static ran up to batch {fits['static']}/rank without running out of memory"
        elif not fits["static"]:
            cell = f"static ran out of memory at batch {limits['static']}/rank, dynamic fits {fits['dynamic']}"
        else:
            ratio = fits["dynamic"] / fits["static"]
            bound = ">= " if limits["dynamic"] is None else ""  # dynamic never ran out: its limit is higher still
            cell = f"{bound}{ratio:.0f}x (batch/rank: static {fits['static']}, dynamic {bound}{fits['dynamic']})"
        paper_cell = "8x (LM)" if s.data["task"] == "LM" else "2x (MT)"
        where = f"{display_path(s.path)}: {s.label}"
        out.append(Headline(f"{claim} ({s.data['task']} model)", paper_cell, cell, where))
    return out or [_missing(claim, paper, "bench")]


def _baseline_range(row: dict) -> str:
    """A serving variant's ratio to the baseline: its range over the rounds, "within noise" when it holds 1."""
    low, high = row.get("x_baseline_min"), row.get("x_baseline_max")
    if low is None or high is None:
        return ""
    return f" [{low:.3f}-{high:.3f}]" + (" within noise" if low <= 1 <= high else "")


def buffering(found: dict[str, list[Source]]) -> list[Headline]:
    saving_claim, paper_saving = "Expert buffering: device memory saving", "up to 1.47x (of static memory)"
    cost_claim, paper_cost = f"Expert buffering: throughput at >= {PAPER_BUFFER_SAVING}x saving", "comparable"
    out = []
    for s in found["buffering"]:
        rows = [r for r in s.data["rows"] if r["slots"] is not None]
        if not rows:
            continue
        top = max(rows, key=lambda r: r["memory_saving"])
        where = f"{display_path(s.path)}: {s.label}; expert weights on the device per rank"
        out.append(Headline(saving_claim, paper_saving, f"up to {top['memory_saving']:.2f}x ({top['variant']})", where))
        enough = [r for r in rows if r["memory_saving"] >= PAPER_BUFFER_SAVING]
        if enough:
            k = max(r["slots"] for r in enough)
            best = max((r for r in enough if r["slots"] == k), key=lambda r: r["x_baseline"])
            cell = f"{best['x_baseline']:.3f}x baseline{_baseline_range(best)} ({best['variant']}, saving "
            cell += f"{best['memory_saving']:.2f}x)"
        else:
            cell = f"no K saves {PAPER_BUFFER_SAVING}x"
        out.append(Headline(cost_claim, paper_cost, cell, where))
    return out or [_missing(saving_claim, paper_saving, "buffering")]


def placement_throughput(found: dict[str, list[Source]]) -> list[Headline]:
    claim, paper = "Placement: serving throughput vs contiguous", "+10.1% LM, +19.5% MT encoder"
    out = []
    for s in found["buffering"]:
        for r in s.data["rows"]:
            if r["slots"] is None and r["variant"] not in ("baseline", "resident"):
                where = f"{display_path(s.path)}: {s.label}, placement {r['placement']}"
                # Contiguous served again from a file changes nothing: its figure is the bench's noise.
                what = "noise control: contiguous again" if r["placement"].startswith("contiguous") else r["variant"]
                cell = f"{(r['x_baseline'] - 1) * 100:+.1f}%{_baseline_range(r)} ({what})"
                out.append(Headline(claim, paper, cell, where))
    if not out:
        command = "launch/infer.py --mode bench-serving --slots-sweep none --placements greedy.json (placement fit)"
        return [Headline(claim, paper, "not measured", f"run: {command}")]
    return out


def replay(found: dict[str, list[Source]]) -> list[Headline]:
    claim, paper = "Expert buffering: LIFO misses over Belady's MIN", "close to Belady (with load balancing)"
    out = []
    for s in found["replay"]:
        ratios = s.data.get("misses_over_belady", {}).get("total", {})
        if "paper" in ratios:
            ratio = ratios["paper"]
            cell = "inf (Belady never missed)" if ratio is None else f"{ratio:.2f}x"
            where = f"{display_path(s.path)}: {s.label}, K = {s.data.get('half_slots', '?')}, all layers"
            out.append(Headline(claim, paper, cell, where))
    return out or [_missing(claim, paper, "replay")]


def placement(found: dict[str, list[Source]]) -> list[Headline]:
    claim, paper = "Greedy placement: Max Load, contiguous -> greedy", "> 0.6 -> < 0.4 (LM)"
    out = []
    for s in found["placement"]:
        loads = {(r["layer"], r["ranks"], r["algorithm"]): r["max_load"] for r in s.data["rows"]}
        changes = [
            (loads[layer, d, "contiguous"] - loads[layer, d, "greedy"], layer, d)
            for layer, d, algorithm in loads
            if algorithm == "greedy" and (layer, d, "contiguous") in loads
        ]
        if not changes:
            continue
        _, layer, d = max(changes, key=lambda c: c[0])  # on a tie, the first in the table's order
        cell = f"{loads[layer, d, 'contiguous']:.2f} -> {loads[layer, d, 'greedy']:.2f}"
        out.append(Headline(claim, paper, cell, f"{display_path(s.path)}: {layer}, D={d} (the largest change)"))
    return out or [_missing(claim, paper, "placement")]


def headlines(found: dict[str, list[Source]]) -> list[Headline]:
    return [
        *throughput(found),
        *peers(found),
        *activation(found),
        *largest_batch(found),
        *buffering(found),
        *replay(found),
        *placement(found),
        *placement_throughput(found),
    ]
