"""What the benchmarks measure when there are no trained weights to measure: a random MoE layer scaled like a trained
one, and the FLOP-equivalent dense FFN the MoE layers are characterised against.

    cfg = layer_config(experts=64, hidden=256, ffn=1024, topk=2)
    router, experts = random_layer(cfg, seed=0)      the same on every rank for the same seed
    dense = DenseEquivalent(cfg, device)             a dense FFN of K*F hidden units: y_TD, stats = dense(x_TD)

Shape legend: T tokens, D model dim, F ffn dim, K experts per token.
"""

from __future__ import annotations

import torch

from moe_infer.model.config import ModelConfig
from moe_infer.moe.experts import ExpertTensors, LocalExperts, RouterTensors
from moe_infer.moe.stats import MoEStats, PhaseTimer

DENSE = "dense-equivalent"  # what the benchmarks call it: a bench-only "policy" beside the MoE ones


def layer_config(experts: int, hidden: int, ffn: int, topk: int, activation: str = "gelu") -> ModelConfig:
    # DeepSpeed's top-1 takes the softmax over all experts, its top-2 renormalises the two: match it either way.
    return ModelConfig.for_moe_layer(
        experts, hidden, ffn, topk, router_pre_softmax=topk == 1, router_bias=False, activation=activation
    )


def random_layer(cfg: ModelConfig, seed: int) -> tuple[RouterTensors, ExpertTensors]:
    """Weights scaled like a trained layer's (std 1/sqrt(fan-in)); the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    f1 = 2 * f if cfg.activation == "swiglu" else f  # swiglu's fc1 computes the gate and the value

    def randn(*shape, fan_in):
        return torch.randn(*shape, generator=gen) / fan_in**0.5

    router = {"weight": randn(cfg.num_experts, d, fan_in=d)}
    experts = {
        e: {
            "fc1.weight": randn(f1, d, fan_in=d),
            "fc1.bias": randn(f1, fan_in=d),
            "fc2.weight": randn(d, f, fan_in=f),
            "fc2.bias": randn(d, fan_in=f),
        }
        for e in range(cfg.num_experts)
    }
    return router, experts


class DenseEquivalent(torch.nn.Module):
    """A dense FFN with K*F hidden units on every token: the FLOPs per token of a top-K MoE layer of `cfg`, no router
    and no exchange (the model the MoE one is characterised against), run by the engine's expert kernel. Random
    weights, scaled like trained ones: there is no trained dense counterpart, and only its time and memory are
    measured. A block (moe_infer.moe.baselines.MoEBlock): y_TD, stats = dense(x_TD)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, seed: int = 0):
        super().__init__()
        dense_cfg = layer_config(1, cfg.hidden_size, cfg.topk * cfg.ffn_hidden_size, 1, cfg.activation)
        _, weights = random_layer(dense_cfg, seed)
        self.ffn = LocalExperts(dense_cfg, [{k: v.to(device) for k, v in weights[0].items()}])

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        stats = MoEStats(tokens=x_TD.shape[0], expert_rows=x_TD.shape[0])
        timer = PhaseTimer(stats, x_TD.device)
        ones_T = torch.ones(x_TD.shape[0], device=x_TD.device)
        y_TD = self.ffn.run(x_TD, ones_T, [x_TD.shape[0]], torch.empty_like(x_TD))
        timer.lap("experts")
        return y_TD, stats
