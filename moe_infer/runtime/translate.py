"""Translation with an encoder-decoder model: greedy or beam search, batched, KV-cached, in lock step with the other
ranks of the EP group.

    settings = TranslationSettings(max_len=64, beam_size=4, length_penalty=1.0, batch_size=8)
    outputs = translate(model, sources, settings, LockStep())   target ids per source, in input order, BOS/EOS excluded
    bleu(detokenized_outputs, references)                       corpus BLEU (sacrebleu)
    score_targets(model, sources, targets)                      sum of log-probs under teacher forcing (+ EOS)

Sources are the encoder's input exactly as in training (ids + EOS); the decoder starts from BOS. `max_len` bounds the
decoder steps: an output has at most max_len tokens, and one shorter than max_len ended with EOS.

How a rank serves its sources: continuous batching (moe_infer.runtime.batching), shortest first, `batch_size`
sentences at a time (times beam_size rows for beam search). A source joins with one encoder call on the right-padded
sources admitted that step (pads masked and kept out of the FFN / MoE) and the decoder's BOS step; then one decoder
call per step for every running row with the KV cache (each row's cross-attention keys computed once). Every rank
makes the same model calls (an idle one on empty batches), so the encoder's and decoder's MoE layers meet on every
rank. Greedy: a row that emits EOS or reaches max_len leaves the batch, the cache and the encoder output at once.
Beam search (fairseq / Hugging Face style, moe_infer.runtime.sequences.BeamSearch): beam_size rows per sentence,
reordered each step; the sentence's rows leave when its search ends.

Shape legend: B batch rows, S source positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sacrebleu
import torch

from moe_infer.model.config import ModelConfig
from moe_infer.model.transformer import EncoderDecoder
from moe_infer.runtime.batch import model_device, right_pad
from moe_infer.runtime.batching import Batcher, run_in_lock_step
from moe_infer.runtime.generate import RequestError, check_tokens, length_order
from moe_infer.runtime.lockstep import LockStep
from moe_infer.runtime.requests import Decoding, Request
from moe_infer.runtime.sequences import normalized_score
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TranslationSettings:
    max_len: int = 128  # decoder steps at most (EOS included)
    beam_size: int = 1  # 1: greedy
    length_penalty: float = 1.0  # hypotheses ranked by sum log-prob / length ** length_penalty
    batch_size: int = 8  # sentences per batch (beam search: times beam_size rows)

    def decoding(self) -> Decoding:
        """How each source is decoded."""
        return Decoding(max_tokens=self.max_len, beam_size=self.beam_size, length_penalty=self.length_penalty)

    def __post_init__(self):
        for name, ok, why in [
            ("max_len", self.max_len >= 1, "must be at least 1"),
            ("beam_size", self.beam_size >= 1, "must be at least 1 (1 is greedy)"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
        ]:
            if not ok:
                raise ConfigError(name, f"{why}, got {getattr(self, name)!r}")


def check_sources(sources: Sequence[Sequence[int]], cfg: ModelConfig, settings: TranslationSettings) -> None:
    """Raise RequestError for an empty source, ids outside [0, vocab), a source longer than the learned positions, or
    a max_len / beam_size the model cannot decode."""
    check_tokens(sources, cfg, "source")
    if cfg.position_embedding == "learned" and settings.max_len > cfg.max_positions:
        raise RequestError(
            f"max_len {settings.max_len} is beyond the model's limit of {cfg.max_positions} learned positions "
            f"(the decoder input is BOS + up to max_len - 1 tokens)"
        )
    if 2 * settings.beam_size > cfg.vocab_size:
        raise RequestError(f"beam_size {settings.beam_size} needs a vocabulary of at least {2 * settings.beam_size}")


def translate(
    model: EncoderDecoder, sources: list[list[int]], settings: TranslationSettings, sync: LockStep | None = None
) -> list[list[int]]:
    """The target ids of each source (BOS and EOS excluded), in input order. Every rank of the EP group calls this
    together, each with its own sources (possibly none) and the same settings."""
    sync = sync or LockStep()
    check_sources(sources, model.cfg, settings)
    requests = [Request(i, sources[i], settings.decoding()) for i in length_order(sources)]
    # The rows a rank decodes at once: batch_size sentences, each with beam_size rows.
    batcher = Batcher(model, settings.batch_size * settings.beam_size)
    outputs = run_in_lock_step(batcher, requests, sync)
    return [outputs[i] for i in range(len(sources))]


@torch.no_grad()
def score_targets(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    eos: bool | Sequence[bool] = True,
    batch_size: int = 8,
) -> list[float]:
    """The model's summed log-prob of each target given its source under teacher forcing, EOS included where `eos`
    says (a translation cut at max_len has none). One process, no lock step: an evaluation helper."""
    cfg, device = model.cfg, model_device(model)
    eos_flags = [eos] * len(targets) if isinstance(eos, bool) else list(eos)
    labels = [list(t) + ([cfg.eos_id] if e else []) for t, e in zip(targets, eos_flags, strict=True)]
    out: list[float] = []
    for start in range(0, len(sources), batch_size):
        src_BS, src_pad_BS = right_pad(sources[start : start + batch_size], cfg.pad_id, device)
        batch_labels = labels[start : start + batch_size]
        tgt_in_BS, _ = right_pad([[cfg.bos_id] + y[:-1] for y in batch_labels], cfg.pad_id, device)
        labels_BS, label_pad_BS = right_pad([y or [cfg.pad_id] for y in batch_labels], cfg.pad_id, device)
        memory_BSD = model.encode(src_BS, src_pad_BS, skip_pads=True)
        logits_BSV = model.decode(tgt_in_BS, memory_BSD, src_pad_BS)[:, : labels_BS.shape[1]]
        logprobs_BS = torch.log_softmax(logits_BSV.float(), dim=-1).gather(-1, labels_BS[..., None])[..., 0]
        logprobs_BS = logprobs_BS.masked_fill(label_pad_BS, 0.0)
        out += [float(lp) if y else 0.0 for lp, y in zip(logprobs_BS.sum(dim=1).tolist(), batch_labels, strict=True)]
    return out


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing) of detokenized strings."""
    if len(hypotheses) != len(references):
        raise RequestError(f"BLEU needs one reference per hypothesis: got {len(hypotheses)} and {len(references)}")
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


__all__ = ["TranslationSettings", "bleu", "check_sources", "normalized_score", "score_targets", "translate"]
