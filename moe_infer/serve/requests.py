"""Requests in, results out: one request per input line (a prompt to continue, or a source sentence to translate),
read on every rank, encoded and checked before any model call; one output per line back.

    lines = read_requests("prompts.txt", rank, world)       a file is read by every rank; stdin by rank 0, then shared
    check_lines(lines, mode, where)                          RequestError for a line that is not text (blank, NUL)
    requests = encode_requests(tokenizer, lines, mode)       prompts: the line's ids; sources: ids + EOS
    check_requests(requests, cfg, mode, settings, where)     RequestError naming the line (from 1) and the limit
    format_output(line, text, "text" | "jsonl")              one output per line, whatever the model wrote

Prompts are the plain token ids of the line (the LM was trained on a stream of documents without BOS); sources are ids
+ EOS, as the MT model was trained (pipeline.train.batches).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

from moe_infer.runtime.generate import RequestError, check_prompts
from moe_infer.runtime.translate import check_sources
from pipeline.errors import ConfigError, PipelineError


def split_lines(text: str) -> list[str]:
    """One request per line; a final newline ends the last line rather than starting an empty one. Only \\n and \\r\\n
    end a line (str.splitlines would also split at form feeds and other separators inside a sentence)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(what, f"cannot read {path}: {err}") from None


def read_stdin() -> str:
    """stdin as UTF-8, strictly, as read_text reads a file: Python's own stdin decoding lets invalid bytes through as
    surrogates (UTF-8 mode, the C locale), which the tokenizer then fails on deep inside."""
    if sys.stdin is None:
        raise ConfigError("--input", "cannot read stdin: it is closed (give the requests with --input FILE)")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("--input", f"cannot read stdin: {err}") from None


def read_requests(source: str, rank: int, world: int) -> list[str]:
    """Every request, on every rank. A file is read by each rank; stdin by rank 0 alone (the launcher's ranks share
    it, and only one may consume it), whose lines (or its read error) are then broadcast to the others."""
    if source != "-":
        return split_lines(read_text(source, "--input"))
    if world == 1:
        return split_lines(read_stdin())
    import torch.distributed as dist

    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [split_lines(read_stdin())]
        except ConfigError as err:
            payload = [err.reason]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise ConfigError("--input", payload[0])
    return payload[0]


def check_text(text: str) -> str | None:
    """Why `text` cannot be a request, or None. Refused on purpose, as almost surely not what the user meant:
    - only whitespace: it encodes to word-start markers alone ("▁▁▁"), so the model would continue (or translate)
      nothing; such a line is a blank line by mistake, in a file or at the end of stdin;
    - a control character other than tab (NUL, escape, form feed, ...): requests are text, and these reach the model
      only as byte pieces the training text never held: a binary or damaged input, not a prompt.
    Empty is left to the token checks, which say so."""
    if text and not text.strip():
        return "holds only whitespace: a request needs text"
    for column, char in enumerate(text, 1):
        if char != "\t" and unicodedata.category(char) == "Cc":
            return (
                f"holds the control character {char!r} (U+{ord(char):04X}) at character {column}: requests are "
                "text (tab is the only control character allowed)"
            )
    return None


def check_lines(lines: list[str], mode: str, where: str) -> None:
    """RequestError naming the first line (from 1) that is not a request's text (check_text)."""
    what = "prompt" if mode == "generate" else "source"
    for number, line in enumerate(lines, 1):
        problem = check_text(line)
        if problem:
            raise RequestError(f"{what} on line {number} of {where} {problem}")


def _name_the_line(err: PipelineError, what: str, where: str) -> str:
    """check_tokens numbers requests from 0; a user knows lines, numbered from 1."""
    return re.sub(rf"^{what} (\d+)", lambda m: f"{what} on line {int(m[1]) + 1} of {where}", str(err), count=1)


def encode_requests(tokenizer, lines: list[str], mode: str) -> list[list[int]]:
    """Prompts: the line's ids. Sources: ids + EOS, the encoder's input in training (an empty line stays empty, so the
    check below names it instead of translating a lone EOS)."""
    ids = tokenizer.encode_batch(lines)
    if mode == "translate":
        return [seq + [tokenizer.sp.eos_id()] if seq else seq for seq in ids]
    return ids


def check_requests(requests: list[list[int]], cfg, mode: str, settings, where: str) -> None:
    if not requests:
        raise RequestError(f"no {'prompts' if mode == 'generate' else 'sources'} in {where}: one per line expected")
    try:
        if mode == "generate":
            check_prompts(requests, cfg, settings.max_new_tokens)
        else:
            check_sources(requests, cfg, settings)
    except RequestError as err:
        raise RequestError(_name_the_line(err, "prompt" if mode == "generate" else "source", where)) from None


def format_output(line: str, text: str, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps({"input": line, "output": text}, ensure_ascii=False)
    return text.replace("\r", "\\r").replace("\n", "\\n")  # one output per line, whatever the model wrote
