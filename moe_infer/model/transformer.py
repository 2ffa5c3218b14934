"""The two architectures of an export, pre-norm transformers in plain torch: DecoderLM (decoder-only LM) and
EncoderDecoder (MT). Module names are the export's tensor names, so dense.safetensors loads as a state dict.

    lm = DecoderLM(cfg); logits_BSV = lm(tokens_BS)                      whole sequences
    cache = lm.new_cache(); lm(prompt_BS, cache); lm(next_B1, cache)     incremental decoding, same logits
    lm(prompts_BS, cache, pad_BS)                    left-padded prompts of different lengths (True = pad): each row
                                                     sees its own positions 0..n-1 and never a pad key, in this call
                                                     and every later one on `cache`; pads skip the FFN / MoE
    cache.select(rows_B)                             drop finished rows / reorder beams (every layer's K/V)
    mt = EncoderDecoder(cfg); memory_BSD = mt.encode(src_BS, src_pad_BS)
    logits_BSV = mt.decode(tgt_BS, memory_BSD, src_pad_BS, cache=None)   cross-attention K/V cached once per layer
    memory_BSD = mt.encode(src_BS, src_pad_BS, skip_pads=True)   serving: positions counted per row from the mask (so
                                                                 left padding works too), pads skip the FFN / MoE

Every call accepts an empty batch (B = 0): a rank of an expert-parallel group with no requests left still runs the
same calls (its MoE layers take part in the all-to-alls with no tokens).

Shape legend: B batch (may be 0), S positions (Ss source, St target), K key positions (cached + new), D model dim,
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import Attention, DenseMLP, KVCache, Norm, rope_angles, rope_angles_at
from moe_infer.model.moe import MoELayer


@dataclass
class LayerCache:
    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)

    def select(self, rows_B: torch.Tensor) -> None:
        self.self_attn.select(rows_B)
        self.cross_attn.select(rows_B)


@dataclass
class Cache:
    """Per-layer caches of one stack and how many key positions they hold (pads included). `pad_BK` marks the padded
    keys (True); None while no call brought padding, so the unpadded path stays exactly the plain one."""

    layers: dict[str, LayerCache]
    length: int = 0
    pad_BK: torch.Tensor | None = None

    def select(self, rows_B: torch.Tensor) -> Cache:
        """Keep these batch rows, in this order (int64 indices; repeats allowed, e.g. to expand into beams). In place;
        returns the cache."""
        for layer in self.layers.values():
            layer.select(rows_B)
        if self.pad_BK is not None:
            self.pad_BK = self.pad_BK.index_select(0, rows_B)
        return self


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, stack: str, number: int, cross: bool):
        super().__init__()
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rope=cfg.position_embedding == "rope", qk_norm=cfg.qk_norm)
        self.cross = cross
        if cross:
            self.cross_norm = Norm(cfg)
            self.cross_attn = Attention(cfg, rope=False)
        self.mlp_norm = Norm(cfg)
        if cfg.is_moe_layer(stack, number):
            self.moe = MoELayer(cfg, f"{stack}.layers.{number}")
        else:
            self.mlp = DenseMLP(cfg)

    def forward(self, x_BSD, mask, angles, cache: LayerCache | None, memory_BKD=None, memory_mask=None, skip_BS=None):
        """`skip_BS`: True at positions whose FFN output is not needed (padding): they get 0 instead."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), mask, angles, cache and cache.self_attn)
        if self.cross:
            h_BSD = self.cross_norm(x_BSD)
            x_BSD = x_BSD + self.cross_attn(h_BSD, memory_mask, cache=cache and cache.cross_attn, memory_BKD=memory_BKD)
        h_BSD = self.mlp_norm(x_BSD)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        if skip_BS is None:
            return x_BSD + ffn(h_BSD)
        # Only the real tokens go through: padding must not take expert capacity or all-to-all bandwidth.
        keep_BS = ~skip_BS
        y_BSD = torch.zeros_like(h_BSD)
        y_BSD[keep_BS] = ffn(h_BSD[keep_BS].unsqueeze(0)).squeeze(0)
        return x_BSD + y_BSD


class Stack(nn.Module):
    """The layers of the encoder or the decoder (numbered from 1) and the final norm."""

    def __init__(self, cfg: ModelConfig, stack: str, num_layers: int, cross: bool):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleDict({str(n): TransformerLayer(cfg, stack, n, cross) for n in range(1, num_layers + 1)})
        self.final_norm = Norm(cfg)

    def new_cache(self) -> Cache:
        return Cache(layers={name: LayerCache() for name in self.layers})

    def forward(
        self,
        x_BSD,
        mask,
        positions: int | torch.Tensor,
        cache: Cache | None = None,
        memory_BKD=None,
        memory_mask=None,
        skip_BS=None,
    ):
        """`positions`: the first position (every row at start..start+S-1) or each token's own [B, S]."""
        angles = None
        if self.cfg.position_embedding == "rope":
            if isinstance(positions, int):
                angles = rope_angles(self.cfg, positions, x_BSD.shape[1], x_BSD.device)  # [S, Dh]
            else:
                angles = rope_angles_at(self.cfg, positions)  # [B, S, Dh]
        for name, layer in self.layers.items():
            layer_cache = cache.layers[name] if cache is not None else None
            x_BSD = layer(x_BSD, mask, angles, layer_cache, memory_BKD, memory_mask, skip_BS)
        if cache is not None:
            cache.length += x_BSD.shape[1]
        return self.final_norm(x_BSD)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_positions = cfg.max_positions
        self.tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta"))
        self.positions = None
        if cfg.position_embedding == "learned":
            self.positions = nn.Parameter(torch.empty(cfg.max_positions, cfg.hidden_size, device="meta"))

    def forward(self, ids_BS: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """`start`: the first position (every row at start..start+S-1) or each token's own positions [B, S]."""
        x_BSD = F.embedding(ids_BS, self.tokens)
        if self.positions is None:
            return x_BSD
        if isinstance(start, int):
            end = start + ids_BS.shape[1]
            if end > self.max_positions and ids_BS.shape[0] > 0:  # an idle rank's empty batch has no positions
                raise ValueError(f"position {end - 1} is beyond the model's {self.max_positions} learned positions")
            return x_BSD + self.positions[start:end]
        last = int(start.max()) if start.numel() else -1  # an empty batch has no positions at all
        if last >= self.max_positions:
            raise ValueError(f"position {last} is beyond the model's {self.max_positions} learned positions")
        return x_BSD + F.embedding(start, self.positions)


class LMHead(nn.Module):
    """Logits from the last hidden states: the token embedding (tied) or a weight of its own, plus an optional bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = (cfg.vocab_size, cfg.hidden_size)
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(shape, device="meta"))
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size, device="meta")) if cfg.lm_head_bias else None

    def forward(self, h_BSD: torch.Tensor, embed: Embedding) -> torch.Tensor:
        return F.linear(h_BSD, embed.tokens if self.weight is None else self.weight, self.bias)


def causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, start + S]: True where key position > query position (queries at start..start+S-1)."""
    q_S1 = torch.arange(start, start + length, device=device)[:, None]
    k_1K = torch.arange(start + length, device=device)[None, :]
    return (k_1K > q_S1)[None, None]


def padding_mask(pad_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, K]: True at padded keys."""
    return pad_BS[:, None, None, :]


def row_positions(past_pad_BK: torch.Tensor, pad_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] int64: each new token's position counted over its row's real (non-pad) tokens only, after the past keys.
    Pads get a harmless in-range position (their outputs are never used)."""
    past_B = (~past_pad_BK).sum(dim=1, keepdim=True)
    return (past_B + torch.cumsum(~pad_BS, dim=1) - 1).clamp(min=0)


def _any(pad_BS: torch.Tensor | None) -> torch.Tensor | None:
    """The mask if it marks anything, else None (the FFN then runs on the whole batch, no gather/scatter)."""
    return pad_BS if pad_BS is not None and bool(pad_BS.any()) else None


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.decoder = Stack(cfg, "decoder", cfg.num_layers, cross=False)
        self.lm_head = LMHead(cfg)

    def new_cache(self) -> Cache:
        return self.decoder.new_cache()

    def forward(
        self, tokens_BS: torch.Tensor, cache: Cache | None = None, pad_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, S, V] logits of `tokens` following whatever `cache` holds (the tokens are then added to it). `pad_BS`
        (True = pad, normally left padding): padded positions are invisible to every query, now and in later calls on
        `cache`, and each row's tokens get positions counted over its real tokens only."""
        start = cache.length if cache is not None else 0
        b, s = tokens_BS.shape
        device = tokens_BS.device
        past_pad_BK = cache.pad_BK if cache is not None else None
        if pad_BS is None and past_pad_BK is None:  # the plain path: every row at positions start..start+S-1
            x_BSD = self.embed(tokens_BS, start)
            h_BSD = self.decoder(x_BSD, causal_mask(start, s, device), start, cache)
            return self.lm_head(h_BSD, self.embed)
        if pad_BS is None:
            pad_BS = torch.zeros(b, s, dtype=torch.bool, device=device)
        if past_pad_BK is None:
            past_pad_BK = torch.zeros(b, start, dtype=torch.bool, device=device)
        positions_BS = row_positions(past_pad_BK, pad_BS)
        key_pad_BK = torch.cat((past_pad_BK, pad_BS), dim=1)
        if cache is not None:
            cache.pad_BK = key_pad_BK
        mask_BHSK = causal_mask(start, s, device) | padding_mask(key_pad_BK)
        x_BSD = self.embed(tokens_BS, positions_BS)
        h_BSD = self.decoder(x_BSD, mask_BHSK, positions_BS, cache, skip_BS=_any(pad_BS))
        return self.lm_head(h_BSD, self.embed)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)  # shared by source and target, as the model was trained
        self.encoder = Stack(cfg, "encoder", cfg.encoder_layers, cross=False)
        self.decoder = Stack(cfg, "decoder", cfg.num_layers, cross=True)
        self.lm_head = LMHead(cfg)

    def new_cache(self) -> Cache:
        return self.decoder.new_cache()

    def encode(self, src_BS: torch.Tensor, src_pad_BS: torch.Tensor, skip_pads: bool = False) -> torch.Tensor:
        """[B, Ss, D] encoder output; padded source positions are hidden from every query. By default the padded
        positions are computed like megatron does (positions 0..Ss-1, FFN on every position: the parity check compares
        them too). `skip_pads`: positions counted over each row's real tokens (right or left padding), pads skip the
        FFN / MoE and their outputs are meaningless (they stay masked for the decoder)."""
        if not skip_pads:
            return self.encoder(self.embed(src_BS), padding_mask(src_pad_BS), 0)
        positions_BS = row_positions(src_pad_BS[:, :0], src_pad_BS)
        x_BSD = self.embed(src_BS, positions_BS)
        return self.encoder(x_BSD, padding_mask(src_pad_BS), positions_BS, skip_BS=_any(src_pad_BS))

    def decode(
        self, tgt_BS: torch.Tensor, memory_BSD: torch.Tensor, src_pad_BS: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """[B, St, V] logits of the target tokens (teacher forcing, or the next ones after what `cache` holds). A cache
        with padded keys (`cache.pad_BK`, rows of different lengths joined into one batch by the runtime's continuous
        batching) works as in DecoderLM: pads are invisible, positions are counted over each row's real tokens."""
        start = cache.length if cache is not None else 0
        memory_mask = padding_mask(src_pad_BS)
        if cache is None or cache.pad_BK is None:  # the plain path: every row at positions start..start+St-1
            x_BSD = self.embed(tgt_BS, start)
            mask = causal_mask(start, tgt_BS.shape[1], tgt_BS.device)
            h_BSD = self.decoder(x_BSD, mask, start, cache, memory_BSD, memory_mask)
            return self.lm_head(h_BSD, self.embed)
        pad_BS = torch.zeros(tgt_BS.shape, dtype=torch.bool, device=tgt_BS.device)
        positions_BS = row_positions(cache.pad_BK, pad_BS)
        cache.pad_BK = torch.cat((cache.pad_BK, pad_BS), dim=1)
        mask_BHSK = causal_mask(start, tgt_BS.shape[1], tgt_BS.device) | padding_mask(cache.pad_BK)
        h_BSD = self.decoder(self.embed(tgt_BS, positions_BS), mask_BHSK, positions_BS, cache, memory_BSD, memory_mask)
        return self.lm_head(h_BSD, self.embed)
