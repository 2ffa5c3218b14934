"""Expert-load history recorded while serving (`launch/infer.py --record-trace FILE`): for every MoE layer and every
model call, how many (token, expert) pairs each expert got over the whole group. It feeds the placement algorithms
(moe_infer.placement) and the cache studies, like the routing traces training records.

    recorder = LoadRecorder(engine, max_calls=4096)   starts recording on every MoE layer of our own policies
    ... serve ...
    counts = recorder.gather()                         {layer name: int64 [calls, E]}, every rank, summed over ranks

Memory stays bounded: each layer keeps its last `max_calls` calls (E int64 counts each); the totals over every call
are kept besides. The ranks call each MoE layer in lock-step (moe_infer.runtime.lockstep), so call i of one rank and
call i of another are the same step of the group and their counts add up; calls in which no rank had a token are
dropped.

Shape legend: C recorded calls, E experts.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from moe_infer.moe.layer import ServedMoELayer
from pipeline.errors import PipelineError


class LoadRecorder:
    def __init__(self, engine, max_calls: int = 4096):
        if max_calls < 1:
            raise PipelineError(
                f"--record-trace keeps the last N calls per layer; N must be at least 1, got {max_calls}"
            )
        self.layers: list[ServedMoELayer] = engine.moe_layers
        self.world_size, self.device = engine.world_size, engine.device
        for layer in self.layers:
            if not isinstance(layer, ServedMoELayer):
                raise PipelineError(
                    f"recording expert loads needs the dynamic or static policy (it reads our router's choices); "
                    f"{layer.name} is served by {type(getattr(layer, 'block', layer)).__name__}"
                )
            layer.recording = True
            layer.counts = deque(maxlen=max_calls)

    def gather(self) -> dict[str, torch.Tensor]:
        """{layer name: int64 [C, E]} of the group (a collective: every rank calls it, in the same order)."""
        history = {}
        for layer in self.layers:
            counts = list(layer.counts)
            counts_CE = torch.stack(counts) if counts else torch.zeros(0, layer.num_experts, dtype=torch.int64)
            if self.world_size > 1:  # on the engine's device: NCCL reduces only CUDA tensors
                counts_CE = counts_CE.to(self.device)
                dist.all_reduce(counts_CE)
                counts_CE = counts_CE.cpu()
            history[layer.name] = counts_CE[counts_CE.sum(1) > 0]
        return history
