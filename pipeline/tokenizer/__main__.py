"""`python -m pipeline.tokenizer lm-tiny mt-tiny`: train (or reuse the cached) tokenizer of each run config and print
token counts per split."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import add_override_argument, load_config
from pipeline.data import iter_texts, prepare_corpus
from pipeline.errors import exit_status
from pipeline.tokenizer import count_tokens, tokenizer_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tokenizer",
        description="Train (or reuse the cached) tokenizer of a run config and print token counts per split.",
    )
    parser.add_argument("configs", nargs="+", help="config names (lm-tiny) or YAML paths")
    add_override_argument(parser)
    args = parser.parse_args(argv)
    return exit_status(report, args)


def report(args: argparse.Namespace) -> int:
    for name in args.configs:
        cfg = load_config(name, args.overrides)
        corpus_dir = prepare_corpus(cfg.data)
        tok = tokenizer_for(cfg)
        print(f"{cfg.name}: corpus {corpus_dir}")
        print(f"  tokenizer {tok.path} ({cfg.tokenizer.model_type}, vocab {tok.vocab_size:,})")
        for split in ("train", "valid", "test"):
            texts = list(iter_texts(cfg.data, split))
            words = sum(len(t.split()) for t in texts)
            tokens = count_tokens(tok, texts)
            print(
                f"  {split:<5}  {len(texts):>9,} lines  {words:>11,} words  {tokens:>11,} tokens"
                f"  ({tokens / max(words, 1):.2f} tokens/word)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
