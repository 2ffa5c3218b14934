"""Translation with an encoder-decoder model: greedy or beam search, batched, KV-cached, in lock step with the other
ranks of the EP group.

    settings = TranslationSettings(max_len=64, beam_size=4, length_penalty=1.0, batch_size=8)
    outputs = translate(model, sources, settings, LockStep())   target ids per source, in input order, BOS/EOS excluded
    bleu(detokenized_outputs, references)                       corpus BLEU (sacrebleu)
    score_targets(model, sources, targets)                      sum of log-probs under teacher forcing (+ EOS)

Sources are the encoder's input exactly as in training (ids + EOS); the decoder starts from BOS. `max_len` bounds the
decoder steps: an output has at most max_len tokens, and one shorter than max_len ended with EOS.

How a rank steps through its sources (the lock-step rules of moe_infer.runtime.generate):
  * sources sorted by length, cut into batches; every rank steps through `sync.max(local batches)` rounds;
  * a round: one encoder call on the right-padded batch (pads masked, kept out of the FFN / MoE; an idle rank encodes
    an empty batch so the encoder's MoE layers still meet), then one decoder call per step with the KV cache (each
    layer's cross-attention K/V computed at the first step only), while `sync.any(rows left)`;
  * greedy: a row that emits EOS or reaches max_len leaves the batch, the cache, the memory and the source mask;
  * beam search (fairseq / Hugging Face style): beam_size rows per sentence; each step keeps the 2k best (beam, token)
    extensions by summed log-prob; an EOS among the first k is a finished hypothesis scored sum / length**penalty
    (length counting the EOS), the first k others become the next beams (the cache reordered with Cache.select). A
    sentence is done once it has k finished hypotheses none of its running beams can beat at their current length,
    or at max_len (its running beams then finish as they are); its rows then leave the batch.

Shape legend: B batch rows (sentences, or sentences x beams), S source positions, D model dim, V vocabulary,
N active sentences, C candidates per sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sacrebleu
import torch

from moe_infer.model.config import ModelConfig
from moe_infer.model.transformer import Cache, EncoderDecoder
from moe_infer.runtime.generate import RequestError, check_tokens, length_sorted_batches, model_device
from moe_infer.runtime.lockstep import LockStep
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TranslationSettings:
    max_len: int = 128  # decoder steps at most (EOS included)
    beam_size: int = 1  # 1: greedy
    length_penalty: float = 1.0  # hypotheses ranked by sum log-prob / length ** length_penalty
    batch_size: int = 8  # sentences per batch (beam search: times beam_size rows)

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


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S] int64 tokens, [B, S] bool pads), rows left-aligned as in training; no rows: a [0, 1] batch."""
    width = max((len(s) for s in seqs), default=1)
    tokens_BS = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    pad_BS = torch.ones(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        tokens_BS[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        pad_BS[row, : len(seq)] = False
    return tokens_BS.to(device), pad_BS.to(device)


def normalized_score(log_prob: float, length: int, length_penalty: float) -> float:
    """The score hypotheses are ranked by: summed log-prob / length ** length_penalty (length counting the EOS)."""
    return log_prob / max(length, 1) ** length_penalty


@dataclass
class Encoded:
    """One round's encoder output and decoder cache, rows selectable (finished rows leave, beams reorder). A decoding
    step is `model.decode(tokens_B[:, None], *encoded.decoder_inputs())`."""

    memory_BSD: torch.Tensor
    src_pad_BS: torch.Tensor
    cache: Cache

    def decoder_inputs(self) -> tuple[torch.Tensor, torch.Tensor, Cache]:
        return self.memory_BSD, self.src_pad_BS, self.cache

    def select(self, rows_B: torch.Tensor) -> None:
        self.cache.select(rows_B)
        self.memory_BSD = self.memory_BSD.index_select(0, rows_B)
        self.src_pad_BS = self.src_pad_BS.index_select(0, rows_B)


@torch.no_grad()
def encode(model: EncoderDecoder, sources: list[list[int]]) -> Encoded:
    """The encoder over one round's sources (no sources: the same model call on an empty batch)."""
    src_BS, src_pad_BS = right_pad(sources, model.cfg.pad_id, model_device(model))
    return Encoded(model.encode(src_BS, src_pad_BS, skip_pads=True), src_pad_BS, model.new_cache())


def _logprobs(logits_BSV: torch.Tensor) -> torch.Tensor:
    """[B, V] float32 log-probs of the next token."""
    return torch.log_softmax(logits_BSV[:, -1].float(), dim=-1)


@torch.no_grad()
def greedy_batch(model: EncoderDecoder, dec: Encoded, settings: TranslationSettings, sync: LockStep) -> list[list[int]]:
    """One round of greedy decoding of the encoded sources (none: the same model calls on empty batches)."""
    cfg, num_sources = model.cfg, dec.memory_BSD.shape[0]
    outputs: list[list[int]] = [[] for _ in range(num_sources)]
    ids = list(range(num_sources))
    tokens_B = torch.full((num_sources,), cfg.bos_id, dtype=torch.int64, device=model_device(model))
    while sync.any(len(ids) > 0):  # one all-reduce per step: every rank stops together
        next_B = _logprobs(model.decode(tokens_B[:, None], *dec.decoder_inputs())).argmax(dim=-1)
        keep = []
        for row, token in enumerate(next_B.tolist()):
            if token != cfg.eos_id:
                outputs[ids[row]].append(token)
                if len(outputs[ids[row]]) < settings.max_len:
                    keep.append(row)
        ids = [ids[row] for row in keep]
        keep_B = torch.tensor(keep, dtype=torch.int64, device=next_B.device)
        if len(keep) != next_B.numel():  # finished rows leave: no more compute on them
            dec.select(keep_B)
        tokens_B = next_B.index_select(0, keep_B)
    return outputs


@dataclass
class _Sentence:
    """One sentence's beam search: running beams (tokens, summed log-prob) and the best finished hypotheses."""

    beams: list[tuple[list[int], float]] = field(default_factory=lambda: [([], 0.0)])
    finished: list[tuple[float, list[int]]] = field(default_factory=list)  # (normalized score, tokens), best first

    def finish(self, tokens: list[int], log_prob: float, length: int, settings: TranslationSettings) -> None:
        self.finished.append((normalized_score(log_prob, length, settings.length_penalty), tokens))
        self.finished.sort(key=lambda f: f[0], reverse=True)
        del self.finished[settings.beam_size :]

    def extend(self, scores_C: list[float], flat_C: list[int], vocab: int, step: int, settings, eos: int) -> list[int]:
        """Take this step's candidates (best first; flat index = beam * V + token); return the beam each new running
        beam comes from."""
        k, length = settings.beam_size, step + 1
        sources, beams = [], []
        for rank, (score, flat) in enumerate(zip(scores_C, flat_C, strict=True)):
            beam, token = divmod(flat, vocab)
            if token == eos:
                if rank < k:  # an EOS outside the first k would not have survived as a beam either
                    self.finish(self.beams[beam][0], score, length, settings)
                continue
            sources.append(beam)
            beams.append((self.beams[beam][0] + [token], score))
            if len(beams) == k:
                break
        self.beams = beams
        return sources

    def done(self, step: int, settings: TranslationSettings) -> bool:
        """Full finished list that no running beam beats at its current length (HF's heuristic), or max_len."""
        length = step + 1
        if length >= settings.max_len:
            for tokens, score in self.beams:  # cut at max_len: finished as they are, no EOS
                self.finish(tokens, score, length, settings)
            return True
        if len(self.finished) < settings.beam_size:
            return False
        best_running = max(normalized_score(score, length, settings.length_penalty) for _, score in self.beams)
        return self.finished[-1][0] >= best_running


@torch.no_grad()
def beam_search_batch(
    model: EncoderDecoder, dec: Encoded, settings: TranslationSettings, sync: LockStep
) -> list[list[int]]:
    """One round of beam search of the encoded sources (none: the same model calls on empty batches)."""
    cfg, k, num_sources = model.cfg, settings.beam_size, dec.memory_BSD.shape[0]
    sentences = [_Sentence() for _ in range(num_sources)]
    active = list(range(num_sources))  # sentences still searching, in row order
    rows_per = 1  # running beams per active sentence: 1 before the first step, k after
    tokens_B = torch.full((num_sources,), cfg.bos_id, dtype=torch.int64, device=model_device(model))
    step = 0
    while sync.any(len(active) > 0):
        logprobs_BV = _logprobs(model.decode(tokens_B[:, None], *dec.decoder_inputs()))
        vocab = logprobs_BV.shape[-1]
        scores_B = torch.tensor(
            [score for j in active for _, score in sentences[j].beams], dtype=torch.float32, device=tokens_B.device
        )
        cand_NR = (scores_B[:, None] + logprobs_BV).view(len(active), rows_per * vocab)
        top = torch.topk(cand_NR, min(2 * k, rows_per * vocab), dim=-1)
        rows, tokens, still = [], [], []
        for n, (j, scores_C, flat_C) in enumerate(zip(active, top.values.tolist(), top.indices.tolist(), strict=True)):
            sentence = sentences[j]
            origins = sentence.extend(scores_C, flat_C, vocab, step, settings, cfg.eos_id)
            if sentence.done(step, settings):
                continue
            still.append(j)
            rows += [n * rows_per + beam for beam in origins]
            tokens += [t[-1] for t, _ in sentence.beams]
        active, rows_per, step = still, k, step + 1
        rows_B = torch.tensor(rows, dtype=torch.int64, device=tokens_B.device)
        dec.select(rows_B)  # reorder the beams, expand the first step's rows, drop done sentences
        tokens_B = torch.tensor(tokens, dtype=torch.int64, device=tokens_B.device)
    return [s.finished[0][1] if s.finished else [] for s in sentences]


def translate(
    model: EncoderDecoder, sources: list[list[int]], settings: TranslationSettings, sync: LockStep | None = None
) -> list[list[int]]:
    """The target ids of each source (BOS and EOS excluded), in input order. Every rank of the EP group calls this
    together, each with its own sources (possibly none) and the same settings."""
    sync = sync or LockStep()
    check_sources(sources, model.cfg, settings)
    run_batch = greedy_batch if settings.beam_size == 1 else beam_search_batch
    batches = length_sorted_batches(sources, settings.batch_size)
    outputs: list[list[int]] = [[] for _ in sources]
    for r in range(sync.max(len(batches))):
        batch = batches[r] if r < len(batches) else []
        encoded = encode(model, [sources[i] for i in batch])
        for i, out in zip(batch, run_batch(model, encoded, settings, sync), strict=True):
            outputs[i] = out
    return outputs


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
