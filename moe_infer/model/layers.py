"""The dense building blocks: norms, rotary positions, attention with a KV cache, the FFN activation and dense MLP.

Numerics follow megatron-core 0.16.1's local (non-TransformerEngine) layers in fp32: torch LayerNorm / RMSNorm with
the configured eps; qk_norm: the same norm per head on q and k (over head_dim) before RoPE; scores = q k^T *
attention_scale (1/sqrt(head_dim)), masked positions filled before a softmax over the keys; exact (erf) GELU;
swiglu = silu(first half of fc1) * second half; rotate-half RoPE on every head dim. Linear layers have biases only
with cfg.bias.

Shape legend: B batch (may be 0: an idle rank's empty batch), S query positions, K key positions (cached + new),
H heads, Dh head dim, D model dim, F ffn dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_infer.model.config import ModelConfig


class Norm(nn.Module):
    """LayerNorm (weight, bias) or RMSNorm (weight only), over the last dim: `size` (default the model dim)."""

    def __init__(self, cfg: ModelConfig, size: int | None = None):
        super().__init__()
        d = size or cfg.hidden_size
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.empty(d, device="meta"))
        self.bias = nn.Parameter(torch.empty(d, device="meta")) if cfg.norm == "layernorm" else None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        shape = (x_BSD.shape[-1],)
        if self.kind == "layernorm":
            return F.layer_norm(x_BSD, shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x_BSD, shape, self.weight, self.eps)


def rope_angles(cfg: ModelConfig, start: int, length: int, device: torch.device) -> torch.Tensor:
    """[S, Dh] angles of positions start..start+length-1 (each frequency twice: rotate-half layout)."""
    return rope_angles_at(cfg, torch.arange(start, start + length, device=device))


def rope_angles_at(cfg: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    """[..., Dh] angles of the given integer positions (any shape, e.g. [B, S] for per-row positions)."""
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dh, 2, dtype=torch.float32, device=positions.device) / dh))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat((freqs, freqs), dim=-1)


def apply_rope(x_BHSD: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """`angles` [S, Dh] (the same positions for every row) or [B, S, Dh] (per-row positions)."""
    if angles.dim() == 3:
        angles = angles.unsqueeze(1)  # broadcast over the heads
    x1, x2 = torch.chunk(x_BHSD, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHSD * angles.cos().to(x_BHSD.dtype) + rotated * angles.sin().to(x_BHSD.dtype)


@dataclass
class KVCache:
    """One attention layer's keys and values so far [B, H, K, Dh]: self-attention grows them by one step at a time,
    cross-attention computes them once from the encoder output."""

    k_BHKD: torch.Tensor | None = None
    v_BHKD: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BHKD is None else self.k_BHKD.shape[2]

    def select(self, rows_B: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) these batch rows."""
        if self.k_BHKD is not None:
            self.k_BHKD = self.k_BHKD.index_select(0, rows_B)
            self.v_BHKD = self.v_BHKD.index_select(0, rows_B)


class Attention(nn.Module):
    """Multi-head attention, self (q, k, v from x) or cross (k, v from the encoder output). `qk_norm`: q and k of every
    head normalised (q_norm, k_norm) before RoPE."""

    def __init__(self, cfg: ModelConfig, rope: bool, qk_norm: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim, self.scale = cfg.num_attention_heads, cfg.head_dim, cfg.attention_scale
        self.rope = rope
        self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=cfg.bias, device="meta") for _ in range(4))
        self.q_norm = Norm(cfg, cfg.head_dim) if qk_norm else None
        self.k_norm = Norm(cfg, cfg.head_dim) if qk_norm else None

    def _split(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        return x_BSD.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_BHKD = self._split(self.k(x_BSD))
        return k_BHKD if self.k_norm is None else self.k_norm(k_BHKD), self._split(self.v(x_BSD))

    def forward(
        self,
        x_BSD: torch.Tensor,
        mask_BHSK: torch.Tensor | None = None,
        angles: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory_BKD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: True where a query must not see a key ([1, 1, S, K] or [B, 1, S, K]); `angles`: RoPE angles,
        [S, Dh] or per row [B, S, Dh]. Self-attention: `cache` (if any) is extended by this call's
        keys. Cross-attention (`memory` given): keys and values come from `cache` when it holds them, else from
        `memory` (and are stored in `cache`)."""
        q_BHSD = self._split(self.q(x_BSD))
        if self.q_norm is not None:
            q_BHSD = self.q_norm(q_BHSD)
        if memory_BKD is None:  # self-attention
            k_BHKD, v_BHKD = self.keys_values(x_BSD)
            if self.rope:
                q_BHSD, k_BHKD = apply_rope(q_BHSD, angles), apply_rope(k_BHKD, angles)
            if cache is not None:
                if cache.k_BHKD is not None:
                    k_BHKD = torch.cat((cache.k_BHKD, k_BHKD), dim=2)
                    v_BHKD = torch.cat((cache.v_BHKD, v_BHKD), dim=2)
                cache.k_BHKD, cache.v_BHKD = k_BHKD, v_BHKD
        elif cache is not None and cache.k_BHKD is not None:
            k_BHKD, v_BHKD = cache.k_BHKD, cache.v_BHKD
        else:
            k_BHKD, v_BHKD = self.keys_values(memory_BKD)
            if cache is not None:
                cache.k_BHKD, cache.v_BHKD = k_BHKD, v_BHKD
        scores_BHSK = torch.matmul(q_BHSD, k_BHKD.transpose(-1, -2)) * self.scale
        if mask_BHSK is not None:
            scores_BHSK = scores_BHSK.masked_fill(mask_BHSK, torch.finfo(scores_BHSK.dtype).min)
        probs_BHSK = torch.softmax(scores_BHSK.float(), dim=-1).to(v_BHKD.dtype)
        ctx_BHSD = torch.matmul(probs_BHSK, v_BHKD)
        b, _, s, _ = ctx_BHSD.shape
        return self.out(ctx_BHSD.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


def activation(kind: str, h_SF: torch.Tensor) -> torch.Tensor:
    """The FFN nonlinearity on fc1's output (F columns for gelu, 2F for swiglu: gate then up)."""
    if kind == "swiglu":
        gate, up = torch.chunk(h_SF, 2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_SF)


class DenseMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rows = 2 * cfg.ffn_hidden_size if cfg.activation == "swiglu" else cfg.ffn_hidden_size
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.hidden_size, rows, bias=cfg.bias, device="meta")
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.bias, device="meta")

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.activation, self.fc1(x_BSD)))
