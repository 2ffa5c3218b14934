"""Greedy decoding for the MT model (megatron T5Model built by pipeline.train.model), with expert parallelism.

Every MoE layer's forward is a collective over the expert-parallel group (the token all-to-all), so all ranks must run
the same sequence of encoder and decoder forwards even though each translates its own sentences: a rank with fewer
batches encodes a one-token dummy batch, and a rank whose sentences all ended keeps stepping the decoder until every
rank is done. The ranks agree on both through an all-reduce (MAX) each batch and each step.

No KV cache: each step re-runs the decoder over the whole prefix (O(L^2) per sentence, cheap at these sizes).

Shape legend: B sentences in a batch, Ss source tokens, St target tokens so far, D hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError
from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from pipeline.train.model import decode, encode


def _agree_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (the value itself without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    flag = torch.tensor([value], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _source_batch(sentences: list[list[int]], max_src: int, device: torch.device):
    """src [B, Ss] (ids + EOS, PAD-padded, at most `max_src` positions) and src_pad [B, Ss] (True at padding)."""
    rows = [s[: max_src - 1] + [EOS_ID] for s in sentences]
    lengths_B = torch.tensor([len(r) for r in rows])
    src_BS = torch.full((len(rows), int(lengths_B.max())), PAD_ID, dtype=torch.int64)
    for i, row in enumerate(rows):
        src_BS[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    src_pad_BS = torch.arange(src_BS.shape[1]) >= lengths_B[:, None]
    return src_BS.to(device), src_pad_BS.to(device)


@torch.no_grad()
def _translate_batch(model, sentences: list[list[int]], max_len: int, device, dummy: bool = False) -> list[list[int]]:
    """Greedy outputs for one batch; keeps stepping (on a finished batch too) while any rank still decodes.

    A `dummy` batch only keeps this rank in step with the others: it starts finished, so it never prolongs decoding.
    """
    src_BS, src_pad_BS = _source_batch(sentences, model.max_sequence_length, device)
    enc_SBD = encode(model, src_BS, src_pad_BS)
    tgt_BS = torch.full((len(sentences), 1), BOS_ID, dtype=torch.int64, device=device)
    done_B = torch.full((len(sentences),), dummy, dtype=torch.bool, device=device)
    for _ in range(max_len):
        if not _agree_max(int(not done_B.all()), device):
            break
        logits_BSV = decode(model, enc_SBD, tgt_BS, src_pad_BS)
        next_B = logits_BSV[:, -1].argmax(dim=-1)
        # Finished rows get PAD: the causal mask keeps later positions from affecting the earlier ones.
        next_B = torch.where(done_B, torch.full_like(next_B, PAD_ID), next_B)
        tgt_BS = torch.cat([tgt_BS, next_B[:, None]], dim=1)
        done_B |= next_B.eq(EOS_ID)
    out = []
    for row in tgt_BS[:, 1:].tolist():
        end = row.index(EOS_ID) if EOS_ID in row else len(row)
        out.append(row[:end])
    return out


def greedy_translate(model, src_ids: list[list[int]], max_len: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy translations of `src_ids` (source token ids without EOS; EOS is appended here, as in MTBatch.src).

    Returns one list of target ids per source, in input order, without BOS/EOS, at most `max_len` tokens (and at
    most the model's max_sequence_length - 1, the positions a target can have after its BOS). Collective with EP > 1:
    every rank calls it, with its own (possibly empty) list of sentences and the same `max_len`.
    """
    if max_len < 1 or batch_size < 1:
        raise PipelineError(f"greedy_translate: max_len and batch_size must be >= 1, got {max_len}, {batch_size}")
    if not hasattr(model, "encoder") or model.encoder is None:
        raise PipelineError("greedy_translate needs the encoder-decoder (task 'mt') model")
    max_len = min(max_len, model.max_sequence_length - 1)
    device = next(model.parameters()).device
    # Similar lengths batched together: less padding. Results go back to input order at the end.
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    num_batches = _agree_max(len(batches), device)
    was_training = model.training
    model.eval()
    results: list[list[int] | None] = [None] * len(src_ids)
    try:
        for b in range(num_batches):
            if b < len(batches):
                outputs = _translate_batch(model, [list(src_ids[i]) for i in batches[b]], max_len, device)
                for i, out in zip(batches[b], outputs, strict=True):
                    results[i] = out
            else:
                _translate_batch(model, [[]], max_len, device, dummy=True)  # this rank's sentences are all done
    finally:
        model.train(was_training)
    return results
