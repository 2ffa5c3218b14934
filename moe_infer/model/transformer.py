"""The two architectures of an export, pre-norm transformers in plain torch: DecoderLM (decoder-only LM) and
EncoderDecoder (MT). Module names are the export's tensor names, so dense.safetensors loads as a state dict.

    lm = DecoderLM(cfg); logits_BSV = lm(tokens_BS)                      whole sequences
    cache = lm.new_cache(); lm(prompt_BS, cache); lm(next_B1, cache)     incremental decoding, same logits
    mt = EncoderDecoder(cfg); memory_BSD = mt.encode(src_BS, src_pad_BS)
    logits_BSV = mt.decode(tgt_BS, memory_BSD, src_pad_BS, cache=None)   cross-attention K/V cached once per layer

Shape legend: B batch, S positions (Ss source, St target), K key positions, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import Attention, DenseMLP, KVCache, Norm, rope_angles
from moe_infer.model.moe import MoELayer


@dataclass
class LayerCache:
    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


@dataclass
class Cache:
    """Per-layer caches of one stack and how many positions they hold."""

    layers: dict[str, LayerCache]
    length: int = 0


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, stack: str, number: int, cross: bool):
        super().__init__()
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rope=cfg.position_embedding == "rope")
        self.cross = cross
        if cross:
            self.cross_norm = Norm(cfg)
            self.cross_attn = Attention(cfg, rope=False)
        self.mlp_norm = Norm(cfg)
        if cfg.is_moe_layer(stack, number):
            self.moe = MoELayer(cfg, f"{stack}.layers.{number}")
        else:
            self.mlp = DenseMLP(cfg)

    def forward(self, x_BSD, mask, angles_SD, cache: LayerCache | None, memory_BKD=None, memory_mask=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), mask, angles_SD, cache and cache.self_attn)
        if self.cross:
            h_BSD = self.cross_norm(x_BSD)
            x_BSD = x_BSD + self.cross_attn(h_BSD, memory_mask, cache=cache and cache.cross_attn, memory_BKD=memory_BKD)
        h_BSD = self.mlp_norm(x_BSD)
        return x_BSD + (self.moe(h_BSD) if hasattr(self, "moe") else self.mlp(h_BSD))


class Stack(nn.Module):
    """The layers of the encoder or the decoder (numbered from 1) and the final norm."""

    def __init__(self, cfg: ModelConfig, stack: str, num_layers: int, cross: bool):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleDict({str(n): TransformerLayer(cfg, stack, n, cross) for n in range(1, num_layers + 1)})
        self.final_norm = Norm(cfg)

    def new_cache(self) -> Cache:
        return Cache(layers={name: LayerCache() for name in self.layers})

    def forward(self, x_BSD, mask, start: int, cache: Cache | None = None, memory_BKD=None, memory_mask=None):
        angles_SD = None
        if self.cfg.position_embedding == "rope":
            angles_SD = rope_angles(self.cfg, start, x_BSD.shape[1], x_BSD.device)
        for name, layer in self.layers.items():
            layer_cache = cache.layers[name] if cache is not None else None
            x_BSD = layer(x_BSD, mask, angles_SD, layer_cache, memory_BKD, memory_mask)
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

    def forward(self, ids_BS: torch.Tensor, start: int = 0) -> torch.Tensor:
        x_BSD = F.embedding(ids_BS, self.tokens)
        if self.positions is not None:
            end = start + ids_BS.shape[1]
            if end > self.max_positions:
                raise ValueError(f"position {end - 1} is beyond the model's {self.max_positions} learned positions")
            x_BSD = x_BSD + self.positions[start:end]
        return x_BSD


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


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.decoder = Stack(cfg, "decoder", cfg.num_layers, cross=False)
        self.lm_head = LMHead(cfg)

    def new_cache(self) -> Cache:
        return self.decoder.new_cache()

    def forward(self, tokens_BS: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """[B, S, V] logits of `tokens` following whatever `cache` holds (the tokens are then added to it)."""
        start = cache.length if cache is not None else 0
        x_BSD = self.embed(tokens_BS, start)
        h_BSD = self.decoder(x_BSD, causal_mask(start, tokens_BS.shape[1], tokens_BS.device), start, cache)
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

    def encode(self, src_BS: torch.Tensor, src_pad_BS: torch.Tensor) -> torch.Tensor:
        """[B, Ss, D] encoder output; padded source positions are hidden from every query."""
        return self.encoder(self.embed(src_BS), padding_mask(src_pad_BS), 0)

    def decode(
        self, tgt_BS: torch.Tensor, memory_BSD: torch.Tensor, src_pad_BS: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """[B, St, V] logits of the target tokens (teacher forcing, or the next ones after what `cache` holds)."""
        start = cache.length if cache is not None else 0
        x_BSD = self.embed(tgt_BS, start)
        mask = causal_mask(start, tgt_BS.shape[1], tgt_BS.device)
        h_BSD = self.decoder(x_BSD, mask, start, cache, memory_BSD, padding_mask(src_pad_BS))
        return self.lm_head(h_BSD, self.embed)
