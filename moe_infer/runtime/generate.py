"""Text generation with a decoder-only LM: batched, KV-cached, in lock step with the other ranks of the EP group.

    settings = GenerationSettings(max_new_tokens=32, temperature=0.8, top_p=0.9, seed=1, batch_size=8)
    check_prompts(prompts, model.cfg, settings.max_new_tokens)     the CLI's early check (generate repeats it)
    new_tokens = generate(model, prompts, settings, LockStep())    per prompt, in input order, EOS excluded

How a rank steps through its prompts:
  * prompts are sorted by length and cut into batches of `batch_size` (similar lengths: little padding); every rank
    steps through `sync.max(number of local batches)` rounds, a rank without a batch left taking an empty one;
  * a round: one prefill call on the left-padded batch (each row sees its own positions 0..n-1, pads are masked), then
    one call per decoding step on the last tokens with the KV cache (`use_cache=False`: the whole sequence again);
  * a row that samples EOS (`stop_at_eos`) or reaches `max_new_tokens` leaves the batch and the cache at once: no
    compute is spent on it; the steps go on while `sync.any(rows left)`, a rank without rows calling the model on an
    empty batch so that every MoE layer's all-to-alls still meet on every rank.

Sampling is in float32: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p
(nucleus) filtering, then one draw. Each prompt draws from its own torch.Generator seeded with (seed, its index in
`prompts`), so a prompt's sample does not depend on which others share its batch.

Shape legend: B batch rows (may be 0), S positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_infer.model.config import ModelConfig
from moe_infer.model.transformer import Cache, DecoderLM
from moe_infer.runtime.lockstep import LockStep
from pipeline.errors import ConfigError, PipelineError


class RequestError(PipelineError):
    """A prompt or source sentence the model cannot take: empty, too long for its positions, unknown token ids."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1: no nucleus filtering
    seed: int = 0
    batch_size: int = 8
    stop_at_eos: bool = True  # a row ends at the model's eos_id (not included in its output)
    use_cache: bool = True  # False: recompute the whole sequence at every step (slow; for checking the cache)

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 turns it off)"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(name, f"{why}, got {getattr(self, name)!r}")


# ---- input checks ---------------------------------------------------------------------------------------------------


def check_tokens(seqs: Sequence[Sequence[int]], cfg: ModelConfig, what: str, extra_positions: int = 0) -> None:
    """Each sequence non-empty, ids in [0, vocab), and (learned position embeddings: a hard limit) no more than
    max_positions positions with `extra_positions` more after it. Raises RequestError naming the sequence (`what` and
    its index) and the limit."""
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            raise RequestError(f"{what} {i} is empty: it needs at least one token")
        bad = next(((j, t) for j, t in enumerate(seq) if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"{what} {i} has token id {bad[1]} at position {bad[0]}, outside the model's vocabulary "
                f"[0, {cfg.vocab_size})"
            )
        needed = len(seq) + extra_positions
        if cfg.position_embedding == "learned" and needed > cfg.max_positions:
            plus = f" + {extra_positions} new tokens" if extra_positions else ""
            raise RequestError(
                f"{what} {i} needs {needed} positions ({len(seq)} tokens{plus}), beyond the model's limit of "
                f"{cfg.max_positions} learned positions"
            )


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int) -> None:
    """Raise RequestError for an empty prompt, an id outside [0, vocab), or (learned positions) a prompt whose length
    plus max_new_tokens exceeds max_positions."""
    check_tokens(prompts, cfg, "prompt", max_new_tokens)


# ---- sampling -------------------------------------------------------------------------------------------------------


def filter_top_k(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """-inf everywhere but each row's k highest logits (ties at the k-th kept); k = 0 or >= V: unchanged."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def filter_top_p(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """-inf everywhere but each row's smallest set of most likely tokens whose probability reaches p (always at least
    the most likely one); p >= 1: unchanged."""
    if p >= 1:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV, dim=-1)
    # A token is dropped when the ones before it already reach p.
    drop_sorted_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV >= p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sampling_probs(logits_BV: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """[B, V] float32 probabilities after temperature, top-k and top-p (temperature > 0)."""
    logits_BV = logits_BV.float() / settings.temperature
    logits_BV = filter_top_p(filter_top_k(logits_BV, settings.top_k), settings.top_p)
    return torch.softmax(logits_BV, dim=-1)


def sample_next(
    logits_BV: torch.Tensor, settings: GenerationSettings, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """[B] int64 next tokens: argmax at temperature 0, else one draw per row from its own generator."""
    if settings.temperature == 0:
        return logits_BV.float().argmax(dim=-1)
    if logits_BV.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=logits_BV.device)
    probs_BV = sampling_probs(logits_BV, settings)
    draws = [torch.multinomial(p_V, 1, generator=g) for p_V, g in zip(probs_BV, generators, strict=True)]
    return torch.cat(draws)


def row_generators(settings: GenerationSettings, ids: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per prompt, seeded from (seed, the prompt's request id): a prompt's sample does not depend on
    which rank serves it or what else is in its batch."""
    return [torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + i) for i in ids]


# ---- the decoding loop ----------------------------------------------------------------------------------------------


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S] int64 tokens, [B, S] bool pads): rows right-aligned. An empty list gives a [0, 1] batch (the shape an
    idle rank passes)."""
    width = max((len(s) for s in seqs), default=1)
    tokens_BS = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    pad_BS = torch.ones(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        tokens_BS[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.int64)
        pad_BS[row, width - len(seq) :] = False
    return tokens_BS.to(device), pad_BS.to(device)


def length_sorted_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `seqs`, shortest first, cut into batches."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def model_device(model: torch.nn.Module) -> torch.device:
    return model.embed.tokens.device


class _Rows:
    """The rows of one batch still decoding: their prompt indices, tokens so far (no-cache mode) and outputs. What the
    model is called with comes from here (`prefill`, `step`); the caller makes the call."""

    def __init__(self, model: DecoderLM, prompts: list[list[int]], settings: GenerationSettings):
        self.model, self.settings = model, settings
        self.ids = list(range(len(prompts)))
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.tokens_BS, self.pad_BS = left_pad(prompts, model.cfg.pad_id, model_device(model))
        self.cache: Cache | None = model.new_cache() if settings.use_cache else None

    def prefill(self) -> tuple[torch.Tensor, Cache | None, torch.Tensor]:
        """The model's inputs for the prompts: (tokens, cache, pads)."""
        return self.tokens_BS, self.cache, self.pad_BS

    def record(self, next_B: torch.Tensor) -> torch.Tensor:
        """Append each row's token; return [B'] the rows that go on (EOS and full rows are done)."""
        keep = []
        eos = self.model.cfg.eos_id if self.settings.stop_at_eos else None
        for row, token in enumerate(next_B.tolist()):
            if token == eos:
                continue
            out = self.outputs[self.ids[row]]
            out.append(token)
            if len(out) < self.settings.max_new_tokens:
                keep.append(row)
        self.ids = [self.ids[row] for row in keep]
        return torch.tensor(keep, dtype=torch.int64, device=next_B.device)

    def step(
        self, next_B: torch.Tensor, keep_B: torch.Tensor
    ) -> tuple[torch.Tensor, Cache | None, torch.Tensor | None]:
        """The model's inputs for the kept rows' new tokens (B' rows, possibly 0): (tokens, cache, pads)."""
        new_B1 = next_B.index_select(0, keep_B)[:, None]
        if self.cache is not None:
            if keep_B.numel() != next_B.numel():  # finished rows leave the cache: no more compute on them
                self.cache.select(keep_B)
            return new_B1, self.cache, None
        self.tokens_BS = torch.cat((self.tokens_BS.index_select(0, keep_B), new_B1), dim=1)
        self.pad_BS = torch.cat((self.pad_BS.index_select(0, keep_B), torch.zeros_like(new_B1, dtype=torch.bool)), 1)
        return self.tokens_BS, None, self.pad_BS


@torch.no_grad()
def generate_batch(
    model: DecoderLM,
    prompts: list[list[int]],
    settings: GenerationSettings,
    sync: LockStep,
    generators: Sequence[torch.Generator],
) -> list[list[int]]:
    """One round: the new tokens of each prompt (possibly none: an idle rank still makes the same model calls)."""
    rows = _Rows(model, prompts, settings)
    logits_BV = model(*rows.prefill())[:, -1]
    gens = list(generators)
    while True:
        next_B = sample_next(logits_BV, settings, gens)
        keep_B = rows.record(next_B)
        gens = [gens[i] for i in keep_B.tolist()]
        if not sync.any(keep_B.numel() > 0):  # one all-reduce per step: every rank stops together
            return rows.outputs
        logits_BV = model(*rows.step(next_B, keep_B))[:, -1]


def generate(
    model: DecoderLM,
    prompts: list[list[int]],
    settings: GenerationSettings,
    sync: LockStep | None = None,
    request_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (EOS excluded), in input order. Every rank of the EP group calls this together,
    each with its own prompts (possibly none) and the same settings. `request_ids` (default 0, 1, ...) are the
    prompts' ids across the whole job, which seed the sampling."""
    sync = sync or LockStep()
    check_prompts(prompts, model.cfg, settings.max_new_tokens)
    batches = length_sorted_batches(prompts, settings.batch_size)
    ids = range(len(prompts)) if request_ids is None else request_ids
    generators = row_generators(settings, ids, model_device(model))
    outputs: list[list[int]] = [[] for _ in prompts]
    for r in range(sync.max(len(batches))):
        batch = batches[r] if r < len(batches) else []
        news = generate_batch(model, [prompts[i] for i in batch], settings, sync, [generators[i] for i in batch])
        for i, new in zip(batch, news, strict=True):
            outputs[i] = new
    return outputs
