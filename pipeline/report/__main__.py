"""Write the experiment report: one self-contained HTML file (figures inlined) and a markdown summary.

    python -m pipeline.report                                   runs/ -> reports/report.html + reports/report.md
    python -m pipeline.report --runs runs --runs /tmp/bench-mt --out reports/report.html [--strict] [--publish]

Scans every --runs directory recursively for the benchmarks' result files (layer-ep*.json, bench.json,
buffering.json, replay.json, placement.table.json), reads them with their W&B runs, and writes the headline table
(measured ratios next to the paper's), one section per experiment (figures, tables, W&B run, settings), the git
revision, date and machine. An experiment with no result file gets a "not run: <command>" line. A result file that
cannot be read or lacks a field is named in a warning line (stderr and the report) and left out; with --strict it
is an error instead (exit 2, nothing written). Both files are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.atomic import write_atomic
from pipeline.errors import PipelineError
from pipeline.outputs import check_output
from pipeline.report import context as report_context
from pipeline.report.headline import headlines
from pipeline.report.html_page import render_html
from pipeline.report.markdown_page import render_markdown
from pipeline.report.sections import build_sections
from pipeline.report.sources import discover, display_path

DEFAULT_RUNS = Path("runs")
DEFAULT_OUT = Path("reports/report.html")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=Path, action="append", help=f"directory to scan recursively (repeatable; default {DEFAULT_RUNS})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the HTML report (default {DEFAULT_OUT})")
    parser.add_argument("--markdown", type=Path, help="the markdown summary (default: --out with .md)")
    parser.add_argument("--strict", action="store_true", help="an unreadable result file is an error, not a warning")
    parser.add_argument("--publish", action="store_true", help="also save a W&B Report (needs WANDB_API_KEY, a server)")
    parser.add_argument("--project", default="moe-pipeline", help="W&B project for --publish")
    parser.add_argument("--entity", help="W&B entity for --publish (default: the API key's)")
    args = parser.parse_args(argv)
    args.runs = args.runs or [DEFAULT_RUNS]
    if args.out.suffix.lower() not in (".html", ".htm"):
        parser.error(f"--out: expected an .html file, got {args.out}")
    args.markdown = args.markdown or args.out.with_suffix(".md")
    return args


def _starts_with(path: Path, text: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(len(text)) == text
    except OSError:
        return False


def _html_report(path: Path) -> str | None:
    head = '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>MoE inference report ('
    return "a previous report" if path.is_file() and _starts_with(path, head) else None


def _markdown_report(path: Path) -> str | None:
    return (
        "a previous report" if path.is_file() and _starts_with(path, "# MoE inference: experiment report\n") else None
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found, problems = discover(args.runs)
    for problem in problems:
        print(f"{'error' if args.strict else 'warning'}: {problem.message}", file=sys.stderr)
    if problems and args.strict:
        print(f"report: {len(problems)} result file(s) unusable (--strict): nothing written", file=sys.stderr)
        return 2
    ctx = report_context.gather()
    roots = [display_path(root) for root in args.runs]
    rows = headlines(found)
    sections = build_sections(found, problems)
    # Both pages are built in memory before either is written: a failure leaves the previous report as it was.
    # A previous report is replaced; any other file at either path is not.
    try:
        for path, recognise in ((args.out, _html_report), (args.markdown, _markdown_report)):
            check_output(
                path, kind="report", recognise=recognise, force=True, note="only a previous report is replaced"
            )
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    html = render_html(ctx, roots, rows, sections, problems)
    markdown = render_markdown(ctx, roots, rows, sections, problems, args.out.name)
    write_atomic(args.out, html)
    write_atomic(args.markdown, markdown)
    counts = ", ".join(f"{kind} {len(sources)}" for kind, sources in found.items())
    print(f"report: {display_path(args.out)} (summary {display_path(args.markdown)}); result files: {counts}")
    for row in rows:
        print(f"  {row.claim}: {row.measured}  [paper: {row.paper}]  ({row.source})")
    if args.publish:
        from pipeline.report.publish import publish

        print(publish(markdown, f"MoE inference report ({ctx.date})", args.project, args.entity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
