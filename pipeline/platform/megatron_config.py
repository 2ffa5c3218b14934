"""megatron-core's TransformerConfig with the settings every model of this project shares: the training models
(pipeline.train.model) and the megatron peer baseline of the serving engine (moe_infer.moe.baselines.megatron).

    config = transformer_config(activation="swiglu", num_layers=2, hidden_size=64, ..., num_moe_experts=8, ...)

What it fixes, and why:
    fusions off   masked_softmax, bias_activation, apply_rope, persist_layer_norm, gradient_accumulation: they have no
                  CPU kernel (or need megatron's compiled CUDA extensions), and the fused ones round differently from
                  the plain-torch reference the exports are checked against (moe_infer.model)
    activation    by name, as the export names it: "gelu" is the exact (erf) GELU; "swiglu" is gated_linear_unit with
                  silu (fc1 holds 2F rows, gate then up)
    MoE experts   (when num_moe_experts is given) SequentialMLP, not grouped GEMM (which needs the grouped_gemm CUDA
                  kernels), and the router in fp32, also under bf16
Every other field is the caller's, passed through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

FUSIONS_OFF = {
    "masked_softmax_fusion": False,
    "bias_activation_fusion": False,
    "apply_rope_fusion": False,
    "persist_layer_norm": False,
    "gradient_accumulation_fusion": False,
}
ACTIVATIONS = ("gelu", "swiglu")


def transformer_config(*, activation: str, **settings: Any):
    """megatron.core.transformer.TransformerConfig(**settings) with the shared settings above."""
    from megatron.core.transformer import TransformerConfig

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    swiglu = activation == "swiglu"
    shared: dict[str, Any] = {"gated_linear_unit": swiglu, "activation_func": F.silu if swiglu else F.gelu}
    shared |= FUSIONS_OFF
    if settings.get("num_moe_experts"):
        shared |= {"moe_grouped_gemm": False, "moe_router_dtype": "fp32"}
    return TransformerConfig(**shared, **settings)
