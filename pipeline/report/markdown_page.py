"""The report's markdown summary: the headline table, what was found where (with its W&B run), what was not run,
and the warnings. Figures and full tables stay in the HTML report, which the summary points to."""

from __future__ import annotations

from pipeline.report.context import Context
from pipeline.report.headline import Headline
from pipeline.report.sections import Heading, Image, Run, Section, Table, Text, fmt
from pipeline.report.sources import Problem, display_path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _run_line(run: Run) -> str:
    info = run.info
    if info.latest is None:
        return f"  - W&B: no offline run in `{display_path(info.run_dir)}` (tracking was disabled)"
    return f"  - W&B run `{info.wandb_id or info.latest.name}` (offline): `{display_path(info.latest)}`"


def render_markdown(
    context: Context,
    roots: list[str],
    headlines: list[Headline],
    sections: list[Section],
    problems: list[Problem],
    html_name: str,
) -> str:
    lines = ["# MoE inference: experiment report", ""]
    lines += [f"- {name}: {value}" for name, value in context.items()]
    lines += [f"- runs scanned: {', '.join(roots)}", f"- figures and full tables: `{html_name}`", ""]
    lines += [f"> warning: {p.message}" for p in problems]
    lines += ["", "## Headline: measured vs the paper", ""]
    lines += ["| claim | paper | measured here | source (file, setting) |", "|---|---|---|---|"]
    lines += [f"| {_cell(h.claim)} | {_cell(h.paper)} | {_cell(h.measured)} | {_cell(h.source)} |" for h in headlines]
    for section in sections:
        lines += ["", f"## {section.title}", ""]
        lines += [f"> warning: {w}" for w in section.warnings]
        if section.not_run:
            lines.append(f"not run: `{section.not_run}`")
        for block in section.blocks:
            if isinstance(block, Heading):
                lines.append(f"- {block.text}")
            elif isinstance(block, Image):
                lines.append(f"  - figure: {block.caption.split('. Command:')[0]}")
            elif isinstance(block, Run):
                lines.append(_run_line(block))
            elif isinstance(block, Text):
                lines.append(f"- {block.text}")
            elif isinstance(block, Table) and section.kind == "projection":  # no figures: its tables are the result
                lines += ["", _cell(block.caption), "", "| " + " | ".join(map(_cell, block.columns)) + " |"]
                lines.append("|" + "---|" * len(block.columns))
                lines += ["| " + " | ".join(_cell(fmt(v)) for v in row) + " |" for row in block.rows]
                lines.append("")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
