"""Next-token choice from a row's logits: greedy (argmax), or a draw after temperature, top-k and top-p (nucleus).

    filter_top_k(logits_BV, k), filter_top_p(logits_BV, p)    -inf outside each row's kept tokens
    sampling_probs(logits_BV, temperature, top_k, top_p)       [B, V] float32 probabilities to draw from
    request_generator(seed, device)                            a request's own torch.Generator

Sampling is in float32: logits / temperature, then top-k, then top-p, then one draw from the row's own generator, so
a request's sample depends only on its seed and its logits, never on the rows that share its batch.

Shape legend: B batch rows, V vocabulary.
"""

from __future__ import annotations

import torch


def filter_top_k(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """-inf everywhere but each row's k highest logits (ties at the k-th kept); k = 0 or >= V: unchanged."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def filter_top_p(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """-inf everywhere but each row's smallest set of most likely tokens whose probability reaches p (always at least
    the most likely one); p >= 1: unchanged."""
    if p >= 1:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV, dim=-1)
    # A token is dropped when the ones before it already reach p.
    drop_sorted_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV >= p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sampling_probs(logits_BV: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B, V] float32 probabilities after temperature (> 0), top-k and top-p."""
    logits_BV = logits_BV.float() / temperature
    logits_BV = filter_top_p(filter_top_k(logits_BV, top_k), top_p)
    return torch.softmax(logits_BV, dim=-1)


def request_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The generator a request draws all its tokens from, one draw per token."""
    return torch.Generator(device=device).manual_seed(seed)
