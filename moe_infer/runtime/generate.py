"""Text generation with a decoder-only LM: batched, KV-cached, in lock step with the other ranks of the EP group.

    settings = GenerationSettings(max_new_tokens=32, temperature=0.8, top_p=0.9, seed=1, batch_size=8)
    check_prompts(prompts, model.cfg, settings.max_new_tokens)     the CLI's early check (generate repeats it)
    new_tokens = generate(model, prompts, settings, LockStep())    per prompt, in input order, EOS excluded

How a rank serves its prompts: continuous batching (moe_infer.runtime.batching), shortest prompts first. A prompt
joins the running batch as soon as there is room among its `batch_size` rows (its prefill: the left-padded prompts
of that step, each row at its own positions 0..n-1, pads masked), every step decodes one token for every running row
with the KV cache (`use_cache=False`: the whole sequence again), and a row that samples EOS (`stop_at_eos`) or reaches
`max_new_tokens` leaves the batch and the cache at once. Every rank makes the same model calls (an idle one on empty
batches) so that every MoE layer's all-to-alls meet on every rank; one all-reduce per step decides them.

Sampling (moe_infer.runtime.sampling) is in float32: temperature 0 is greedy (argmax); otherwise logits /
temperature, then top-k, then top-p (nucleus) filtering, then one draw. Prompt i draws from its own torch.Generator
seeded with `seed + i` (i: its request id, its index in the job's input), so its sample does not depend on which
rank serves it or which others share its batch; the HTTP server seeds a request's prompts the same way from the
request's `seed` (moe_infer.serve.protocol).

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_infer.model.config import ModelConfig
from moe_infer.model.transformer import DecoderLM
from moe_infer.runtime.batching import Batcher, run_in_lock_step
from moe_infer.runtime.lockstep import LockStep
from moe_infer.runtime.requests import Decoding, Request
from moe_infer.runtime.sampling import filter_top_k, filter_top_p
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

    def decoding(self, request_id: int) -> Decoding:
        """How the request with this id is decoded: these settings, sampling with the seed `seed + request_id`."""
        return Decoding(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed + request_id,
            stop_at_eos=self.stop_at_eos,
        )

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


# ---- the decoding loop ----------------------------------------------------------------------------------------------


def generate(
    model: DecoderLM,
    prompts: list[list[int]],
    settings: GenerationSettings,
    sync: LockStep | None = None,
    request_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (EOS excluded), in input order. Every rank of the EP group calls this together,
    each with its own prompts (possibly none) and the same settings. `request_ids` (default 0, 1, ...) are the
    prompts' ids across the whole job: prompt i samples with the seed `settings.seed + request_ids[i]`."""
    sync = sync or LockStep()
    check_prompts(prompts, model.cfg, settings.max_new_tokens)
    ids = range(len(prompts)) if request_ids is None else request_ids
    requests = [Request(i, prompts[i], settings.decoding(ids[i])) for i in length_order(prompts)]
    batcher = Batcher(model, settings.batch_size, use_cache=settings.use_cache)
    outputs = run_in_lock_step(batcher, requests, sync)
    return [outputs[i] for i in range(len(prompts))]


def length_order(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `seqs`, shortest first: requests admitted together need little padding."""
    return sorted(range(len(seqs)), key=lambda i: len(seqs[i]))


__all__ = [
    "GenerationSettings",
    "RequestError",
    "check_prompts",
    "check_tokens",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "length_order",
]
