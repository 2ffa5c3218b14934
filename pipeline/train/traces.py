"""Routing traces on a held-out split: each real token's selected experts per MoE layer per batch, for the expert
placement and expert-cache studies. The file layout is moe_infer.placement.routing_traces's.

Every rank routes its own share of the split (rank r runs eval batches r, r + dp_size, ...); rank 0 gathers them into
one file in global batch order. Padding tokens are routed by the model too, but they are not traffic a server would see,
so they are dropped: the MT encoder keeps source tokens, the decoder target tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moe_infer.placement.routing_traces import save_traces
from pipeline.config import RunConfig
from pipeline.tokenizer import PAD_ID, Tokenizer
from pipeline.train.batch import LMBatch
from pipeline.train.batches import build_batches
from pipeline.train.model import model_loss
from pipeline.train.routing import RoutingRecorder


@torch.no_grad()
def record_routing_traces(
    cfg: RunConfig, model, tok: Tokenizer, split: str, run_dir: Path, step: int, groups
) -> Path | None:
    """Collective over the DP group. Returns the .npz path on rank 0, None elsewhere."""
    device = next(model.parameters()).device
    batches = build_batches(cfg, tok, split, groups.dp_rank, groups.dp_size).eval_batches()
    was_training = model.training
    model.eval()
    local: dict[str, dict[int, np.ndarray]] = {}
    with RoutingRecorder(model, record_tokens=True) as recorder:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            model_loss(model, batch)
            if batch.num_tokens > 0:  # else a stand-in batch that keeps the ranks in step: no traffic
                global_batch = i * groups.dp_size + groups.dp_rank
                for layer, calls in recorder.traces().items():
                    experts_Tk = calls[-1]
                    if isinstance(batch, LMBatch):  # the recorder drops MT padding itself; an LM tail window is padded
                        experts_Tk = experts_Tk[(batch.tokens != PAD_ID).T.reshape(-1).cpu()]
                    local.setdefault(layer, {})[global_batch] = experts_Tk.numpy()
            recorder.reset()
        layer_names = recorder.layer_names
    model.train(was_training)
    gathered = [None] * groups.dp_size
    dist.all_gather_object(gathered, local, group=groups.dp)
    if dist.get_rank() != 0:
        return None
    merged = {layer: {b: arr for part in gathered for b, arr in part.get(layer, {}).items()} for layer in layer_names}
    num_batches = 1 + max((b for rows in merged.values() for b in rows), default=-1)
    empty_k = np.zeros((0, cfg.moe.topk), dtype=np.int16)
    # save_traces numbers batches by list position: one entry per global batch, empty for the stand-ins.
    traces = {
        layer: [torch.from_numpy(rows.get(b, empty_k)) for b in range(num_batches)] for layer, rows in merged.items()
    }
    meta = {
        "config": cfg.name,
        "task": cfg.task,
        "split": split,
        "step": step,
        "num_experts": cfg.moe.num_experts,
        "topk": cfg.moe.topk,
        "ep_size": cfg.parallel.ep_size,
        "micro_batch_size": cfg.train.micro_batch_size,
    }
    return save_traces(traces, run_dir / "traces" / f"{split}-step{step:06d}.npz", meta)
