"""Parity: the same batch through megatron-core and through the exported model (loaded from disk, checksums and
all), in fp32. The figure is the max relative difference max|a - b| / max|a| over all positions, with a the
megatron output; the conversion fails above LIMIT.

LM: a packed window batch of the validation split, logits compared. MT: a batch of validation pairs with padding,
the encoder output and the decoder logits (teacher-forced) compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import DataError, PipelineError

LIMIT = 1e-4


class ParityError(PipelineError):
    """The export does not compute what the checkpoint's megatron model computes."""


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max|a - b| / max|a|, in float64 on the CPU."""
    a, b = reference.detach().double().cpu(), other.detach().double().cpu()
    if a.shape != b.shape:
        raise ParityError(f"output shapes differ: megatron {list(a.shape)}, export {list(b.shape)}")
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def parity_batch(cfg, tokenizer):
    """The first evaluation batch of the validation split of the checkpoint's own corpus."""
    from pipeline.train.batches import build_batches

    try:
        return build_batches(cfg, tokenizer, "valid", dp_rank=0, dp_size=1, shuffle=False).eval_batches()[0]
    except DataError as err:
        raise DataError(
            f"cannot build the parity batch from the validation split: {err} (or use --no-verify)"
        ) from None


@torch.no_grad()
def check_parity(megatron_model, export_dir: Path, cfg, tokenizer, device: torch.device) -> dict[str, Any]:
    """Compare megatron and the export on one batch; returns the figures, raises ParityError above LIMIT."""
    from moe_infer.model import load_model
    from pipeline.train.model import decode, encode, model_logits

    batch = parity_batch(cfg, tokenizer).to(device)
    megatron_model = megatron_model.float().eval()
    exported = load_model(export_dir, device=device, dtype=torch.float32)
    if cfg.task == "lm":
        tokens = batch.tokens
        figures = {"logits": relative_difference(model_logits(megatron_model, batch), exported(tokens))}
        shape = f"{tokens.shape[0]}x{tokens.shape[1]} tokens"
    else:
        enc_SBD = encode(megatron_model, batch.src, batch.src_pad)
        ref_logits = decode(megatron_model, enc_SBD, batch.tgt_in, batch.src_pad, batch.tgt_pad).float()
        memory_BSD = exported.encode(batch.src, batch.src_pad)
        figures = {
            "encoder_output": relative_difference(enc_SBD.transpose(0, 1), memory_BSD),
            "decoder_logits": relative_difference(ref_logits, exported.decode(batch.tgt_in, memory_BSD, batch.src_pad)),
        }
        pads = int(batch.src_pad.sum()) + int(batch.tgt_pad.sum())
        shape = (
            f"{batch.src.shape[0]} pairs ({batch.src.shape[0]}x{batch.src.shape[1]} source, "
            f"{batch.tgt_in.shape[0]}x{batch.tgt_in.shape[1]} target tokens, {pads} of them padding)"
        )
    result = {
        "metric": "max|megatron - export| / max|megatron|, fp32",
        "limit": LIMIT,
        "batch": f"validation split, {shape}",
        **figures,
        "passed": all(v <= LIMIT for v in figures.values()),
    }
    return result


def describe(result: dict[str, Any], task: str) -> str:
    figures = [k for k in ("logits", "encoder_output", "decoder_logits") if k in result]
    parts = ", ".join(f"{k.replace('_', ' ')} {result[k]:.1e}" for k in figures)
    label = "LM" if task == "lm" else "MT"
    return (
        f"parity: {label} max relative difference (max|megatron - export| / max|megatron|, fp32) {parts} "
        f"(limit {result['limit']:.0e}) on {result['batch']}"
    )
