"""The peer MoE layers the engine is measured against, loaded with the same exported weights as our own layer:
DeepSpeed's `deepspeed.moe.layer.MoE` (static capacity, or padded to the largest count with drop_tokens=False) and
megatron-core's MoELayer (dropless, alltoall dispatcher). Each is imported only when asked for (moe_infer.moe.layer
builds them), so serving never needs megatron-core.

A peer does router -> dispatch -> experts -> combine inside its own module, so it is a block (MoEBlock) that the
engine wraps in a PeerMoELayer:

    y_TD, stats = block(x_TD)      every rank of the EP group calls it together, with its own T (possibly 0)

Shape legend: T tokens, D model dim.
"""

from typing import Protocol

import torch

from moe_infer.moe.stats import MoEStats


class MoEBlock(Protocol):
    def __call__(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]: ...
