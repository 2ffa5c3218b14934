"""One small random MoE layer for the dispatch and baseline tests, and the single-process reference it must match.

    cfg = layer_config(topk=2, pre_softmax=False)
    router, experts = random_layer(cfg)          the same weights on every rank (one seed), all E experts
    y_TD = reference_moe(x_TD, *router(x_TD), experts)

Shape legend: T tokens, K experts per token, D model dim, E experts.
"""

import torch

from moe_infer.model import ExpertFFN, ModelConfig, Router, combine, dispatch

E, D, F = 8, 16, 32


def layer_config(topk: int, pre_softmax: bool, router_bias: bool = True, activation: str = "gelu") -> ModelConfig:
    return ModelConfig.for_moe_layer(
        E, D, F, topk, router_pre_softmax=pre_softmax, router_bias=router_bias, activation=activation
    )


def _randomized(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    module = module.to_empty(device="cpu").requires_grad_(False)
    for param in module.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return module


def random_layer(cfg: ModelConfig) -> tuple[Router, list[ExpertFFN]]:
    """The same router and full expert set on every rank (one seed); a policy or block then uses the local ones."""
    gen = torch.Generator().manual_seed(1234)
    return _randomized(Router(cfg), gen), [_randomized(ExpertFFN(cfg), gen) for _ in range(E)]


def reference_moe(x_TD, probs_TK, experts_TK, experts) -> torch.Tensor:
    plan = dispatch(experts_TK, probs_TK, E)
    y = [experts[e](x_TD[plan.tokens_of(e)], plan.probs_of(e)) for e in range(E) if plan.count(e)]
    return combine(torch.cat(y) if y else x_TD.new_zeros(0, D), plan, x_TD.shape[0])


def kept_within_capacity(experts_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """Independent count: per expert, all first choices in token order, then all second choices; the first
    `capacity` pairs of each expert are kept."""
    kept_TK = torch.zeros(experts_TK.shape, dtype=torch.bool)
    seen = [0] * E
    for k in range(experts_TK.shape[1]):
        for t in range(experts_TK.shape[0]):
            e = int(experts_TK[t, k])
            kept_TK[t, k] = seen[e] < capacity
            seen[e] += 1
    return kept_TK
