"""Requests in, results out: one request per input line (a prompt to continue, or a source sentence to translate),
read on every rank, encoded and checked before any model call; one output per line back.

    lines = read_requests("prompts.txt", rank, world)       a file is read by every rank; stdin by rank 0, then shared
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


def read_requests(source: str, rank: int, world: int) -> list[str]:
    """Every request, on every rank. A file is read by each rank; stdin by rank 0 alone (the launcher's ranks share
    it, and only one may consume it), whose lines (or its read error) are then broadcast to the others."""
    if source != "-":
        return split_lines(read_text(source, "--input"))
    if world == 1:
        return split_lines(sys.stdin.read())
    import torch.distributed as dist

    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [split_lines(sys.stdin.read())]
        except (OSError, UnicodeDecodeError) as err:
            payload = [f"cannot read stdin: {err}"]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise ConfigError("--input", payload[0])
    return payload[0]


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
