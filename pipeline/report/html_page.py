"""The report as one self-contained HTML file: figures inlined as base64 PNG data URIs, a small inline stylesheet,
no scripts and nothing fetched, so the file can be mailed, attached to an issue or opened offline."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from pipeline.report.context import Context
from pipeline.report.headline import Headline
from pipeline.report.sections import Details, Heading, Image, Run, Section, Table, Text, fmt
from pipeline.report.sources import Problem, display_path

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { margin: 0 0 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h3 { margin: 28px 0 8px; font-size: 16px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.headline { width: 100%; table-layout: fixed; }
table.headline td.measured { font-weight: 600; } table.headline td.claim { background: #fafafa; }
table.kv th { width: 160px; font-weight: 600; }
figure { margin: 12px 0; } figure img { width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #555; font-size: 13px; margin-top: 4px; }
code { font-size: 12px; background: #f4f4f4; padding: 1px 3px; word-break: break-all; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 6px 10px; margin: 6px 0; }
.notrun { background: #f4f4f4; border-left: 4px solid #999; padding: 6px 10px; }
.run { font-size: 13px; color: #333; }
details { margin: 6px 0 12px; font-size: 13px; } summary { cursor: pointer; color: #335; }
.muted { color: #666; } nav a { margin-right: 14px; }
"""


def _table(table: Table, css: str = "") -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    right = [table.right_aligned(i) for i in range(len(table.columns))]
    cells = (
        "".join(f"<td{' class=num' if r else ''}>{escape(fmt(v))}</td>" for v, r in zip(row, right, strict=True))
        for row in table.rows
    )
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    caption = f'<div class="caption">{escape(table.caption)}</div>' if table.caption else ""
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>{caption}'


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return escape(text)


def _kv(items: list[tuple[str, Any]] | dict[str, Any]) -> str:
    pairs = items.items() if isinstance(items, dict) else items
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _run(run: Run) -> str:
    info = run.info
    if info.latest is None:
        return (
            f'<p class="run">W&amp;B: no offline run in {escape(display_path(info.run_dir))} '
            "(tracking was disabled); the plain files above are the record.</p>"
        )
    latest = info.latest.resolve()
    text = (
        f"W&amp;B run <b>{escape(info.wandb_id or latest.name.rsplit('-', 1)[-1])}</b> (offline): "
        f'<a href="{escape(latest.as_uri())}">{escape(display_path(info.latest))}</a>'
    )
    if len(info.offline_runs) > 1:
        text += f" and {len(info.offline_runs) - 1} earlier attempt(s)"
    return f'<p class="run">{text}. Upload: <code>{escape(info.sync_command() or "")}</code></p>'


def _block(block) -> str:
    if isinstance(block, Heading):
        return f"<h3>{escape(block.text)}</h3>"
    if isinstance(block, Text):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        alt = escape(block.caption.split(". Command:")[0])
        caption = escape(block.caption).replace("Command: ", "Command: <code>", 1)
        caption += "</code>" if "<code>" in caption else ""
        return (
            f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
        )
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Run):
        return _run(block)
    if isinstance(block, Details):
        return f"<details><summary>{escape(block.summary)}</summary>{_kv(block.items)}</details>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _section(section: Section) -> str:
    parts = [f'<h2 id="{section.kind}">{escape(section.title)}</h2>', f'<p class="muted">{escape(section.intro)}</p>']
    parts += [f'<div class="warn">warning: {escape(w)}</div>' for w in section.warnings]
    if section.not_run:
        parts.append(f'<p class="notrun">not run: <code>{escape(section.not_run)}</code></p>')
    parts += [_block(b) for b in section.blocks]
    return "\n".join(parts)


def _same_claim(headlines: list[Headline], start: int):
    for h in headlines[start:]:
        if h.claim != headlines[start].claim:
            return
        yield h


def render_html(
    context: Context, roots: list[str], headlines: list[Headline], sections: list[Section], problems: list[Problem]
) -> str:
    rows, previous = [], None
    for i, h in enumerate(headlines):
        # One claim cell per claim, spanning its rows (a claim measured by several files).
        span = sum(1 for _ in _same_claim(headlines, i)) if h.claim != previous else 0
        claim = f'<td class="claim" rowspan="{span}">{escape(h.claim)}</td>' if span else ""
        rows.append(
            f'<tr>{claim}<td>{escape(h.paper)}</td><td class="measured">{escape(h.measured)}</td>'
            f"<td>{escape(h.source)}</td></tr>"
        )
        previous = h.claim
    widths = "".join(f'<col style="width:{w}%">' for w in (22, 17, 25, 36))
    head = "".join(f"<th>{c}</th>" for c in ("claim", "paper", "measured here", "source (file, setting)"))
    nav = "".join(f'<a href="#{s.kind}">{escape(s.title)}</a>' for s in sections)
    warnings = "".join(f'<div class="warn">warning: {escape(p.message)}</div>' for p in problems)
    body = [
        "<h1>MoE inference: experiment report</h1>",
        '<p class="muted">Results read from the runs on disk (plain files beside each offline W&amp;B run), '
        "set against Huang et al., <i>Towards MoE Deployment</i> (arXiv 2303.06182).</p>",
        _kv([*context.items(), ("runs scanned", ", ".join(roots))]),
        warnings,
        '<h2 id="headline">Headline: measured vs the paper</h2>',
        f'<table class="headline">{widths}<tr>{head}</tr>{"".join(rows)}</table>',
        '<div class="caption">The paper\'s numbers are for 52B/54.5B-parameter models on V100/A5000 GPUs; '
        "these runs are tiny models, mostly on CPU, so the ratios show direction and mechanism, not scale.</div>",
        f"<nav><p>{nav}</p></nav>",
        *(_section(s) for s in sections),
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>MoE inference report ({escape(context.date)})</title><style>{STYLE}</style></head>\n"
        "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )
