"""A Hugging Face directory checked against the export it came from, on held-out text, all in fp32:

    logits     the same windows of held-out tokens through transformers (AutoModelForCausalLM, whatever class the
               directory names: it must be Qwen3MoeForCausalLM) and through our model (moe_infer.model.load_model):
               max|ours - theirs| / max|ours| at most LIMIT
    greedy     prompts cut from held-out lines, continued greedily by transformers' `generate` (one prompt at a time)
               and by our generation loop (moe_infer.runtime.generate: batched, left-padded, KV-cached): the same
               tokens, EOS excluded
    tokenizer  AutoTokenizer of the directory against the sentencepiece model on every held-out text: the same ids,
               and decode gives the text back

    figures = verify(hf_dir, export, texts)        raises HFParityError when any of them fails

Shape legend: B batch rows, S positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.convert.verify import relative_difference
from pipeline.errors import PipelineError
from pipeline.tokenizer import EOS_ID, Tokenizer

LIMIT = 1e-4
ROWS, WINDOW = 4, 128  # logits on ROWS windows of up to WINDOW held-out tokens
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 12, 24


class HFParityError(PipelineError):
    """transformers does not compute (or tokenize) what our export computes."""


@dataclass
class Reference:
    """Our side: the export's model in fp32 and its tokenizer."""

    model: Any
    tokenizer: Tokenizer


def held_out_windows(tokenizer: Tokenizer, texts: list[str], max_positions: int) -> torch.Tensor:
    """[B, S] token windows of the held-out texts, packed as in training (each text followed by EOS)."""
    stream = [i for text in texts for i in (*tokenizer.encode(text), EOS_ID)]
    length = min(WINDOW, max_positions, len(stream) // ROWS)
    if length < 2:
        raise HFParityError(f"the held-out text is too short to verify with ({len(stream)} tokens)")
    return torch.tensor(stream[: ROWS * length]).view(ROWS, length)


def held_out_prompts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """The first PROMPT_TOKENS tokens of the first PROMPTS held-out lines long enough for it."""
    prompts = []
    for line in (line for text in texts for line in text.splitlines()):
        ids = tokenizer.encode(line)
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(ids[:PROMPT_TOKENS])
        if len(prompts) == PROMPTS:
            break
    if not prompts:
        raise HFParityError(f"no held-out line has {PROMPT_TOKENS} tokens to make a prompt of")
    return prompts


@torch.no_grad()
def check_logits(hf_model, ours: Reference, windows_BS: torch.Tensor) -> dict[str, Any]:
    theirs_BSV = hf_model(input_ids=windows_BS, use_cache=False).logits.float()
    difference = relative_difference(ours.model(windows_BS), theirs_BSV)
    return {
        "max_relative_difference": difference,
        "limit": LIMIT,
        "tokens": f"{windows_BS.shape[0]}x{windows_BS.shape[1]} held-out tokens",
        "passed": difference <= LIMIT,
    }


@torch.no_grad()
def check_greedy(hf_model, ours: Reference, prompts: list[list[int]], max_positions: int) -> dict[str, Any]:
    from moe_infer.runtime.generate import GenerationSettings, generate

    new_tokens = max(1, min(NEW_TOKENS, max_positions - max(map(len, prompts))))
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0, batch_size=len(prompts))
    ours_out = generate(ours.model, prompts, settings)
    theirs_out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
        new = out[0, len(prompt) :].tolist()
        theirs_out.append(new[: new.index(EOS_ID)] if EOS_ID in new else new)
    same = [a == b for a, b in zip(ours_out, theirs_out, strict=True)]
    return {
        "prompts": len(prompts),
        "max_new_tokens": new_tokens,
        "identical": sum(same),
        "passed": all(same),
        "example": {
            "prompt": ours.tokenizer.decode(prompts[0]),
            "ours": ours.tokenizer.decode(ours_out[0]),
            "transformers": ours.tokenizer.decode(theirs_out[0]),
        },
    }


def check_tokenizer(hf_dir: Path, ours: Reference, texts: list[str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(hf_dir))
    ids_ours = [ours.tokenizer.encode(text) for text in texts]
    ids_theirs = [theirs(text, verbose=False)["input_ids"] for text in texts]  # long texts: no length warning
    same_ids = sum(a == b for a, b in zip(ids_ours, ids_theirs, strict=True))
    round_trips = sum(theirs.decode(ids) == text for ids, text in zip(ids_theirs, texts, strict=True))
    return {
        "texts": len(texts),
        "characters": sum(map(len, texts)),
        "tokens": sum(map(len, ids_ours)),
        "same_ids": same_ids,
        "round_trips": round_trips,
        "passed": same_ids == round_trips == len(texts),
    }


def verify(hf_dir: Path, export_dir: Path, texts: list[str]) -> dict[str, Any]:
    """Every check above on the directory `hf_dir` written from `export_dir`; raises HFParityError if one fails."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from moe_infer.hf_layout import ARCHITECTURE

    transformers_logging.disable_progress_bar()  # the converter prints its own lines
    from moe_infer.model import Export, load_model

    export = Export.open(export_dir)
    ours = Reference(load_model(export, dtype=torch.float32), Tokenizer(export.tokenizer_bytes()))
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if type(hf_model).__name__ != ARCHITECTURE:
        raise HFParityError(f"transformers loads {hf_dir} as {type(hf_model).__name__}, not {ARCHITECTURE}")
    max_positions = export.model_config.max_positions
    figures = {
        "logits": check_logits(hf_model, ours, held_out_windows(ours.tokenizer, texts, max_positions)),
        "greedy": check_greedy(hf_model, ours, held_out_prompts(ours.tokenizer, texts), max_positions),
        "tokenizer": check_tokenizer(hf_dir, ours, texts),
    }
    failed = [name for name, figure in figures.items() if not figure["passed"]]
    if failed:
        raise HFParityError(f"{describe(figures)}: {', '.join(failed)} failed, nothing was written")
    return figures


def describe(figures: dict[str, Any]) -> str:
    logits, greedy, tok = figures["logits"], figures["greedy"], figures["tokenizer"]
    return (
        f"transformers vs our engine (fp32): logits max relative difference {logits['max_relative_difference']:.1e} "
        f"(limit {logits['limit']:.0e}) on {logits['tokens']}; greedy: {greedy['identical']}/{greedy['prompts']} "
        f"prompts identical over {greedy['max_new_tokens']} new tokens; tokenizer: {tok['same_ids']}/{tok['texts']} "
        f"held-out texts ({tok['tokens']} tokens) with the same ids, {tok['round_trips']} decoded back exactly"
    )
