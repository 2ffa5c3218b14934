"""The model an export describes, as typed values: built from a validated config.json (moe_infer.export_format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "decoder" | "encoder-decoder"
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    head_dim: int
    num_layers: int  # decoder layers
    encoder_layers: int
    max_positions: int
    vocab_size: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    activation: str  # "gelu" | "swiglu"
    position_embedding: str  # "learned" | "rope"
    rope_base: float
    attention_scale: float
    tie_embeddings: bool
    lm_head_bias: bool
    bias: bool  # every linear layer has a bias (attention, FFNs, experts); the router's is router_bias
    qk_norm: bool  # self-attention: a per-head norm (norm's kind, over head_dim) on queries and keys before RoPE
    num_experts: int
    topk: int
    moe_layers: dict[str, tuple[int, ...]]  # stack -> MoE layer numbers (from 1)
    router_pre_softmax: bool
    router_bias: bool
    pad_id: int
    bos_id: int
    eos_id: int

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> ModelConfig:
        m, moe, tok = config["model"], config["moe"], config["tokenizer"]
        return cls(
            architecture=config["architecture"],
            hidden_size=m["hidden_size"],
            ffn_hidden_size=m["ffn_hidden_size"],
            num_attention_heads=m["num_attention_heads"],
            head_dim=m["head_dim"],
            num_layers=m["num_layers"],
            encoder_layers=m["encoder_layers"],
            max_positions=m["max_positions"],
            vocab_size=m["vocab_size"],
            norm=m["norm"],
            norm_eps=float(m["norm_eps"]),
            activation=m["activation"],
            position_embedding=m["position_embedding"],
            rope_base=float(m["rope_base"]),
            attention_scale=float(m["attention_scale"]),
            tie_embeddings=m["tie_embeddings"],
            lm_head_bias=m["lm_head_bias"],
            bias=m["bias"],
            qk_norm=m["qk_norm"],
            num_experts=moe["num_experts"],
            topk=moe["topk"],
            moe_layers={stack: tuple(layers) for stack, layers in moe["moe_layers"].items()},
            router_pre_softmax=moe["router"]["pre_softmax"],
            router_bias=moe["router"]["bias"],
            pad_id=tok["pad_id"],
            bos_id=tok["bos_id"],
            eos_id=tok["eos_id"],
        )

    @classmethod
    def for_moe_layer(
        cls,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        topk: int,
        *,
        router_pre_softmax: bool,
        router_bias: bool,
        activation: str = "gelu",
        bias: bool = True,
    ) -> ModelConfig:
        """What one MoE layer reads (router, experts), the rest of a one-layer model filled in: for benchmarks and
        tests that build a layer without an export."""
        return cls(
            architecture="decoder",
            hidden_size=hidden_size,
            ffn_hidden_size=ffn_hidden_size,
            num_attention_heads=1,
            head_dim=hidden_size,
            num_layers=1,
            encoder_layers=0,
            max_positions=1,
            vocab_size=1,
            norm="layernorm",
            norm_eps=1e-5,
            activation=activation,
            position_embedding="learned",
            rope_base=10000.0,
            attention_scale=1.0,
            tie_embeddings=True,
            lm_head_bias=False,
            bias=bias,
            qk_norm=False,
            num_experts=num_experts,
            topk=topk,
            moe_layers={"decoder": (1,)},
            router_pre_softmax=router_pre_softmax,
            router_bias=router_bias,
            pad_id=0,
            bos_id=0,
            eos_id=0,
        )

    def is_moe_layer(self, stack: str, layer: int) -> bool:
        return layer in self.moe_layers.get(stack, ())
