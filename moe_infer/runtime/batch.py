"""The model side of a rank's running rows: their KV cache (MT: and the encoder output), the next input token of each
row, and the model calls that continuous batching makes on them.

    batch, logits_BV = prefill(model, prompts_or_sources)   new rows: an LM prefill (left-padded prompts), or an MT
                                                            encoder call and the decoder's first (BOS) step
    running = running.join(batch)                           new rows join the running ones (see below)
    running.select(rows)                                    keep / reorder / repeat rows (ended rows leave, beams
                                                            reorder); the cache is trimmed of keys no row needs
    running.next_B = tokens; logits_BV = decode(model, running)    one step on every row (none: an idle rank's call)

Joining: every row's keys are aligned on the right, so a batch whose cache holds K_a keys per row and one holding
K_b join by left-padding the shorter to max(K_a, K_b) key columns, marked as pads in the cache's mask (`pad_BK`, True
= pad). The model never lets a query see a pad key and counts each row's positions over its real tokens only
(moe_infer.model.transformer), so a row's logits are those of its tokens alone, whatever it shares the batch with.
MT's encoder output, source mask and cross-attention keys are padded on the right to the longest source instead
(cross-attention has no positions). When rows leave, key columns that are pads in every remaining row are dropped.

The LM can also run without a cache (`use_cache=False`: every step recomputes the whole sequence, for checking the
cache): the batch then keeps every row's tokens, left-padded, instead.

Shape legend: B rows, S positions, K key positions (cached), Ss source positions, H heads, Dh head dim, D model dim,
V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_infer.model.layers import KVCache
from moe_infer.model.transformer import Cache, DecoderLM, EncoderDecoder, LayerCache


def model_device(model: torch.nn.Module) -> torch.device:
    return model.embed.tokens.device


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


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S] int64 tokens, [B, S] bool pads), rows left-aligned as in training; no rows: a [0, 1] batch."""
    width = max((len(s) for s in seqs), default=1)
    tokens_BS = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    pad_BS = torch.ones(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        tokens_BS[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        pad_BS[row, : len(seq)] = False
    return tokens_BS.to(device), pad_BS.to(device)


def _pad_dim(t: torch.Tensor, dim: int, before: int, after: int, value: float | bool = 0) -> torch.Tensor:
    if before == 0 and after == 0:
        return t
    spec = [0, 0] * (t.dim() - 1 - dim) + [before, after]  # F.pad lists the last dimension first
    return F.pad(t, spec, value=value)


@dataclass
class RunningBatch:
    size: int = 0
    next_B: torch.Tensor | None = None  # each row's next input token
    cache: Cache | None = None
    memory_BSD: torch.Tensor | None = None  # MT: the encoder output and its source pads
    src_pad_BS: torch.Tensor | None = None
    tokens_BS: torch.Tensor | None = None  # LM without a cache: every row's tokens so far, left-padded
    pad_BS: torch.Tensor | None = None

    def select(self, rows: list[int]) -> None:
        """Keep these rows, in this order (repeats allowed: beams); key columns no row needs any more are dropped."""
        if not rows:
            self.__dict__.update(RunningBatch().__dict__)
            return
        rows_B = torch.tensor(rows, dtype=torch.int64, device=self.next_B.device)
        self.size, self.next_B = len(rows), self.next_B.index_select(0, rows_B)
        if self.cache is not None:
            self.cache.select(rows_B)
        for name in ("memory_BSD", "src_pad_BS", "tokens_BS", "pad_BS"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows_B))
        self._trim()

    def join(self, other: RunningBatch) -> RunningBatch:
        """These rows, then `other`'s, as one batch (see the module docstring)."""
        if other.size == 0:
            return self
        if self.size == 0:
            return other
        joined = RunningBatch(self.size + other.size, torch.cat((self.next_B, other.next_B)))
        if self.cache is not None:
            joined.cache = _join_caches(self.cache, other.cache)
        if self.memory_BSD is not None:
            width = max(self.memory_BSD.shape[1], other.memory_BSD.shape[1])
            joined.memory_BSD = torch.cat(
                [_pad_dim(b.memory_BSD, 1, 0, width - b.memory_BSD.shape[1]) for b in (self, other)]
            )
            joined.src_pad_BS = torch.cat(
                [_pad_dim(b.src_pad_BS, 1, 0, width - b.src_pad_BS.shape[1], True) for b in (self, other)]
            )
        if self.tokens_BS is not None:
            width = max(self.tokens_BS.shape[1], other.tokens_BS.shape[1])
            joined.tokens_BS = torch.cat(
                [_pad_dim(b.tokens_BS, 1, width - b.tokens_BS.shape[1], 0) for b in (self, other)]
            )
            joined.pad_BS = torch.cat(
                [_pad_dim(b.pad_BS, 1, width - b.pad_BS.shape[1], 0, True) for b in (self, other)]
            )
        return joined

    def _trim(self) -> None:
        """Drop the leading key columns that are pads in every row (and, MT, the trailing all-pad source columns)."""
        if self.cache is not None and self.cache.pad_BK is not None:
            lead = _leading_true(self.cache.pad_BK.all(dim=0))
            if lead:
                for layer in self.cache.layers.values():
                    kv = layer.self_attn
                    kv.k_BHKD, kv.v_BHKD = kv.k_BHKD[:, :, lead:], kv.v_BHKD[:, :, lead:]
                self.cache.pad_BK, self.cache.length = self.cache.pad_BK[:, lead:], self.cache.length - lead
        if self.src_pad_BS is not None:
            tail = _leading_true(self.src_pad_BS.all(dim=0).flip(0))
            if tail:
                keep = self.src_pad_BS.shape[1] - tail
                self.memory_BSD, self.src_pad_BS = self.memory_BSD[:, :keep], self.src_pad_BS[:, :keep]
                for layer in self.cache.layers.values():
                    kv = layer.cross_attn
                    kv.k_BHKD, kv.v_BHKD = kv.k_BHKD[:, :, :keep], kv.v_BHKD[:, :, :keep]
        if self.pad_BS is not None:
            lead = _leading_true(self.pad_BS.all(dim=0))
            self.tokens_BS, self.pad_BS = self.tokens_BS[:, lead:], self.pad_BS[:, lead:]


def _leading_true(flags_K: torch.Tensor) -> int:
    """How many entries at the start are True."""
    return int(flags_K.int().cumprod(dim=0).sum()) if flags_K.numel() else 0


def _join_caches(a: Cache, b: Cache) -> Cache:
    width = max(a.length, b.length)
    layers = {}
    for name, la in a.layers.items():
        lb = b.layers[name]
        layer = LayerCache()
        layer.self_attn = KVCache(
            *(
                torch.cat([_pad_dim(t, 2, width - t.shape[2], 0) for t in pair])
                for pair in _kv_pairs(la, lb, "self_attn")
            )
        )
        if la.cross_attn.k_BHKD is not None:
            sources = max(la.cross_attn.length, lb.cross_attn.length)
            layer.cross_attn = KVCache(
                *(
                    torch.cat([_pad_dim(t, 2, 0, sources - t.shape[2]) for t in pair])
                    for pair in _kv_pairs(la, lb, "cross_attn")
                )
            )
        layers[name] = layer
    pads = [_key_pads(c, width) for c in (a, b)]
    return Cache(layers, width, torch.cat(pads))


def _kv_pairs(la: LayerCache, lb: LayerCache, which: str):
    ka, kb = getattr(la, which), getattr(lb, which)
    return (ka.k_BHKD, kb.k_BHKD), (ka.v_BHKD, kb.v_BHKD)


def _key_pads(cache: Cache, width: int) -> torch.Tensor:
    """[B, width] the cache's key pads, left-padded with pads to `width` columns."""
    some = next(iter(cache.layers.values())).self_attn.k_BHKD
    pad_BK = cache.pad_BK
    if pad_BK is None:
        pad_BK = torch.zeros(some.shape[0], cache.length, dtype=torch.bool, device=some.device)
    return _pad_dim(pad_BK, 1, width - cache.length, 0, True)


# ---- the model calls ------------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    model: DecoderLM | EncoderDecoder, seqs: list[list[int]], use_cache: bool = True
) -> tuple[RunningBatch, torch.Tensor]:
    """New rows and their first next-token logits [B, V]: LM, the left-padded prompts through the model; MT, the
    right-padded sources through the encoder (pads skip the FFN / MoE) and BOS through the decoder. No rows: the same
    calls on an empty batch (an idle rank's share of the MoE exchanges)."""
    device, cfg = model_device(model), model.cfg
    if isinstance(model, EncoderDecoder):
        src_BS, src_pad_BS = right_pad(seqs, cfg.pad_id, device)
        memory_BSD = model.encode(src_BS, src_pad_BS, skip_pads=True)
        cache = model.new_cache()
        bos_B1 = torch.full((len(seqs), 1), cfg.bos_id, dtype=torch.int64, device=device)
        logits_BV = model.decode(bos_B1, memory_BSD, src_pad_BS, cache)[:, -1]
        return RunningBatch(len(seqs), bos_B1[:, 0], cache, memory_BSD, src_pad_BS), logits_BV
    tokens_BS, pad_BS = left_pad(seqs, cfg.pad_id, device)
    if use_cache:
        cache = model.new_cache()
        logits_BV = model(tokens_BS, cache, pad_BS)[:, -1]
        return RunningBatch(len(seqs), tokens_BS[:, -1], cache), logits_BV
    logits_BV = model(tokens_BS, None, pad_BS)[:, -1]
    return RunningBatch(len(seqs), tokens_BS[:, -1], tokens_BS=tokens_BS, pad_BS=pad_BS), logits_BV


@torch.no_grad()
def decode(model: DecoderLM | EncoderDecoder, batch: RunningBatch) -> torch.Tensor:
    """[B, V] next-token logits after each row's `next_B` (an empty batch: the same call with no rows)."""
    device = model_device(model)
    if isinstance(model, EncoderDecoder):
        if batch.size == 0:
            empty = torch.zeros(0, 1, dtype=torch.int64, device=device)
            memory = torch.zeros(0, 1, model.cfg.hidden_size, dtype=model.embed.tokens.dtype, device=device)
            return model.decode(empty, memory, torch.ones(0, 1, dtype=torch.bool, device=device))[:, -1]
        return model.decode(batch.next_B[:, None], batch.memory_BSD, batch.src_pad_BS, batch.cache)[:, -1]
    if batch.size == 0:
        return model(torch.zeros(0, 1, dtype=torch.int64, device=device))[:, -1]
    if batch.tokens_BS is not None:  # no cache: the whole sequence again
        batch.tokens_BS = torch.cat((batch.tokens_BS, batch.next_B[:, None]), dim=1)
        batch.pad_BS = torch.cat((batch.pad_BS, torch.zeros_like(batch.next_B[:, None], dtype=torch.bool)), dim=1)
        return model(batch.tokens_BS, None, batch.pad_BS)[:, -1]
    return model(batch.next_B[:, None], batch.cache)[:, -1]
