"""The MoE layer in separate small parts: router (top-k), dispatch/combine, expert FFN.

    probs_TK, experts_TK = router(x_TD)                   which k experts each token goes to, with what weight
    plan = dispatch(experts_TK, probs_TK, num_experts)    (token, slot) pairs grouped by expert
    y_NE = expert(x_TD[plan.tokens_of(e)], plan.probs_of(e))   for each expert e that got tokens
    y_TD = combine(y_N, plan, T)                          each token's expert outputs summed

The dispatch here is the single-process reference (every expert local, no capacity limit, nothing dropped); under
expert parallelism the served layer's dispatchers (moe_infer.moe.dispatch) replace `dispatch`/`combine` and keep the
router and the experts as they are.

megatron-core 0.16.1 numerics, matched in fp32: router logits in fp32 (`x @ W^T + b`); pre_softmax: softmax over all
experts then top-k (the k probabilities do not sum to 1), else top-k of the logits then softmax over those k. The
probability is applied inside the expert, to the activation and to fc2's bias (megatron's per_token_scale in MLP):
y = fc2.weight @ (act(fc1(x)) * p) + fc2.bias * p (no bias term without cfg.bias). A token's outputs are added in
ascending expert order.

Shape legend: T tokens, K experts per token (top-k), E experts, N (token, expert) pairs (T*K), D model dim, F ffn dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import DenseMLP, activation
from moe_infer.model.routing_kernels import RoutedRows, route, route_rows, top_k


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.pre_softmax = cfg.topk, cfg.router_pre_softmax
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, device="meta"))
        self.bias = nn.Parameter(torch.empty(cfg.num_experts, device="meta")) if cfg.router_bias else None
        # (the weight it was made from, that weight's data pointer and version, the transpose): _compiled_weight
        self._weight_DE: tuple[torch.Tensor, int, int, torch.Tensor] | None = None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs_TK fp32, experts_TK int64), the k experts of each token in descending score order."""
        bias_E, x_TD = _fp32(self.bias), _fp32(x_TD)
        weight_DE = self._compiled_weight(x_TD)
        if weight_DE is not None:  # logits, top-k and softmax in one compiled pass on CPU, where it runs
            routed = route(x_TD, weight_DE, bias_E, self.topk)
            if routed is not None:
                return routed
        logits_TE = torch.nn.functional.linear(x_TD, self.weight.float(), bias_E)
        if self.pre_softmax:
            return top_k(torch.softmax(logits_TE, dim=-1, dtype=torch.float32), self.topk)
        return top_k(logits_TE, self.topk, softmax=True)  # top-k then a softmax over those k, in one CPU pass

    def grouped(self, x_TD: torch.Tensor) -> RoutedRows | None:
        """forward's choice, and the pairs' rows and probabilities grouped by expert, in one compiled call
        (routing_kernels.route_rows): the whole routing of one rank that holds every expert. None where it does not
        run (then forward, and a sort and a gather of the caller's)."""
        x_TD = _fp32(x_TD)
        weight_DE = self._compiled_weight(x_TD)
        if weight_DE is None:
            return None
        return route_rows(x_TD, weight_DE, _fp32(self.bias), self.topk)

    def _compiled_weight(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The weight as [D, E] fp32, what the compiled router reads (routing_kernels.route), when it may run: top-k
        then softmax (not pre_softmax), no gradient wanted, on CPU. Made once, and again whenever the weight is
        replaced or changed in place; None too for a weight that keeps no version counter (an inference-mode tensor:
        a change could not be seen)."""
        weight_ED = self.weight
        if self.pre_softmax or weight_ED.device.type != "cpu" or torch.is_inference(weight_ED):
            return None
        if torch.is_grad_enabled() and (x_TD.requires_grad or weight_ED.requires_grad):
            return None
        cached = self._weight_DE
        pointer, version = weight_ED.data_ptr(), weight_ED._version
        if cached is None or cached[0] is not weight_ED or cached[1:3] != (pointer, version):
            cached = self._weight_DE = (weight_ED, pointer, version, weight_ED.detach().float().t().contiguous())
        return cached[3]


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in fp32 (None stays None). Checked first: even a conversion that has nothing to do is a torch op, and every
    op costs the router time on a cold cache (routing_kernels)."""
    return t if t is None or t.dtype == torch.float32 else t.float()


class ExpertFFN(DenseMLP):
    """One expert: the dense FFN's weights, with the routing probability applied between activation and fc2."""

    def forward(self, x_ND: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
        h_NF = activation(self.activation, self.fc1(x_ND))
        h_NF = (h_NF * probs_N.unsqueeze(-1)).to(x_ND.dtype)
        y_ND = torch.nn.functional.linear(h_NF, self.fc2.weight)
        if self.fc2.bias is None:
            return y_ND
        return y_ND + self.fc2.bias * probs_N.unsqueeze(-1).to(y_ND.dtype)


@dataclass
class DispatchPlan:
    """The (token, expert) pairs grouped by expert, ascending: expert e's pairs are offsets[e]:offsets[e + 1]."""

    token_N: torch.Tensor  # int64: the token of each pair
    probs_N: torch.Tensor  # fp32: its routing probability
    offsets: list[int]  # E + 1 entries

    def count(self, expert: int) -> int:
        return self.offsets[expert + 1] - self.offsets[expert]

    def tokens_of(self, expert: int) -> torch.Tensor:
        return self.token_N[self.offsets[expert] : self.offsets[expert + 1]]

    def probs_of(self, expert: int) -> torch.Tensor:
        return self.probs_N[self.offsets[expert] : self.offsets[expert + 1]]


def dispatch(experts_TK: torch.Tensor, probs_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Group the pairs by expert (stable: tokens in order within an expert)."""
    t, k = experts_TK.shape
    expert_N = experts_TK.reshape(-1)
    order_N = torch.sort(expert_N, stable=True).indices
    token_N = torch.arange(t, device=experts_TK.device).repeat_interleave(k)[order_N]
    counts_E = torch.bincount(expert_N, minlength=num_experts)
    offsets = [0, *torch.cumsum(counts_E, 0).tolist()]
    return DispatchPlan(token_N=token_N, probs_N=probs_TK.reshape(-1)[order_N], offsets=offsets)


def combine(y_ND: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """[T, D]: each token's expert outputs summed (pairs in plan order)."""
    out_TD = torch.zeros(num_tokens, y_ND.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
    return out_TD.index_add_(0, plan.token_N, y_ND)


class MoELayer(nn.Module):
    """Router + the experts loaded here (`experts` holds str(expert id) -> ExpertFFN; a rank may hold a subset)."""

    def __init__(self, cfg: ModelConfig, name: str):
        super().__init__()
        self.name, self.num_experts = name, cfg.num_experts
        self.router = Router(cfg)
        self.experts = nn.ModuleDict()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs_TK, experts_TK = self.router(x_TD)
        plan = dispatch(experts_TK, probs_TK, self.num_experts)
        outputs = []
        for e in range(self.num_experts):
            if plan.count(e) == 0:
                continue
            if str(e) not in self.experts:
                raise RuntimeError(f"{self.name}: tokens are routed to expert {e}, which was not loaded here")
            outputs.append(self.experts[str(e)](x_TD[plan.tokens_of(e)], plan.probs_of(e)))
        y_ND = torch.cat(outputs) if outputs else x_TD.new_zeros(0, x_TD.shape[-1])
        return combine(y_ND, plan, x_TD.shape[0]).view_as(x_BSD)
