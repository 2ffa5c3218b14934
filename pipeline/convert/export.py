"""Write an export directory (layout: moe_infer.export_format): config.json, the tokenizer, safetensors weights with
one file per expert, and the manifest last. Everything goes to a temporary directory next to the target, which is
renamed into place only when complete (pipeline.atomic.staged_directory); `describe_export` recognises an existing
export, the only thing --force replaces.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_infer import export_format as fmt
from pipeline.convert.source import Source
from pipeline.outputs import OutputError
from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from pipeline.train.checkpoint import git_revision

# megatron TransformerConfig settings the export format (and moe_infer) has no place for: they must have these values.
_UNSUPPORTED = {
    "num_query_groups": None,  # grouped-query attention (None or the head count is plain multi-head)
    "softmax_scale": None,
    "apply_query_key_layer_scaling": False,
    "add_qkv_bias": False,  # a q/k/v bias without the other linear biases (model.bias covers all of them alike)
    "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False,
    "rotary_interleaved": False,
    "glu_linear_offset": 0.0,
    "activation_func_clamp_value": None,
    "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_num_groups": None,
    "moe_expert_capacity_factor": None,
    "moe_shared_expert_intermediate_size": None,
    "moe_apply_probs_on_input": False,
    "moe_input_jitter_eps": None,
    "moe_latent_size": None,
}
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_config(source: Source, megatron_model: torch.nn.Module) -> dict[str, Any]:
    """config.json (without the parity figure, added after verification) from the run config and megatron's own."""
    from pipeline.errors import CheckpointError

    mcfg = megatron_model.config
    for name, value in _UNSUPPORTED.items():
        got = getattr(mcfg, name, value)
        if got != value and not (name == "num_query_groups" and got == mcfg.num_attention_heads):
            raise CheckpointError(f"{source.ckpt}: megatron setting {name}={got!r} is not supported by the export")
    cfg, meta = source.cfg, source.meta
    m, moe = cfg.model, cfg.moe
    lm = cfg.task == "lm"
    stacks = [("decoder", m.num_layers)] + ([] if lm else [("encoder", m.encoder_layers)])
    head_dim = m.hidden_size // m.num_attention_heads
    dtype = next(megatron_model.parameters()).dtype
    return {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "architecture": "decoder" if lm else "encoder-decoder",
        "model": {
            "hidden_size": m.hidden_size,
            "ffn_hidden_size": m.ffn_hidden_size,
            "num_attention_heads": m.num_attention_heads,
            "head_dim": head_dim,
            "num_layers": m.num_layers,
            "encoder_layers": 0 if lm else m.encoder_layers,
            "max_positions": m.seq_length,
            "vocab_size": source.tokenizer.vocab_size,
            "norm": m.norm,
            "norm_eps": mcfg.layernorm_epsilon,
            "activation": m.activation,
            "position_embedding": m.position_embedding,
            "rope_base": float(getattr(megatron_model, "rotary_base", 10000)),
            "attention_scale": 1.0 / math.sqrt(mcfg.kv_channels or head_dim),
            "tie_embeddings": m.tie_embeddings,
            # T5's lm_head has a bias exactly when it shares the embedding (megatron T5LMHead); GPT's never.
            "lm_head_bias": not lm and m.tie_embeddings,
            "dtype": _DTYPES[dtype],
            "bias": bool(mcfg.add_bias_linear),
            "qk_norm": bool(mcfg.qk_layernorm),
        },
        "moe": {
            "num_experts": moe.num_experts,
            "topk": moe.topk,
            "interval": moe.interval,
            "moe_layers": {stack: fmt.moe_layers(n, moe.num_experts, moe.interval) for stack, n in stacks},
            "capacity_fraction": moe.capacity_fraction,
            "router": {
                "score_function": "softmax",
                "pre_softmax": moe.router_pre_softmax,
                "bias": bool(mcfg.add_bias_linear),
                "dtype": "fp32",
            },
        },
        "tokenizer": {
            "file": fmt.TOKENIZER_FILE,
            "vocab_size": source.tokenizer.vocab_size,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
        },
        "provenance": {
            "source_checkpoint": str(source.ckpt.resolve()),
            "step": meta["step"],
            "trained_ep_size": meta.get("ep_size"),
            "trained_world_size": meta.get("world_size"),
            "run_config": source.saved,
            "training_git_revision": meta.get("git_revision", "unknown"),
            "converter_git_revision": git_revision(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


def write_config(directory: Path, config: dict[str, Any]) -> None:
    fmt.validate_config(config, f"{directory / fmt.CONFIG_FILE} (being written)")
    (directory / fmt.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_manifest(directory: Path) -> dict[str, Any]:
    manifest = fmt.build_manifest(directory)
    (directory / fmt.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_export(
    directory: Path,
    config: dict[str, Any],
    dense: dict[str, torch.Tensor],
    experts: dict[fmt.ExpertKey, dict[str, torch.Tensor]],
    tokenizer_bytes: bytes,
) -> dict[str, Any]:
    """Every file of an export into `directory` (empty), the manifest last; returns the manifest."""
    write_config(directory, config)
    (directory / fmt.TOKENIZER_FILE).write_bytes(tokenizer_bytes)
    save_file(dense, str(directory / fmt.DENSE_FILE), metadata=_metadata(part="dense"))
    (directory / fmt.EXPERTS_DIR).mkdir()
    for (stack, layer, expert), tensors in sorted(experts.items()):
        meta = _metadata(part="expert", stack=stack, layer=layer, expert=expert)
        save_file(tensors, str(directory / fmt.expert_file(stack, layer, expert)), metadata=meta)
    return write_manifest(directory)


def _metadata(**fields: Any) -> dict[str, str]:
    # One key: safetensors writes its metadata map in a random order, and the same checkpoint must give the same bytes.
    return {fmt.FORMAT: json.dumps(fields, sort_keys=True)}


def describe_export(path: Path) -> str | None:
    """'an export (lm-tiny, step 300)' when `path` is an export directory (config.json carries the format tag) holding
    nothing an export does not hold; None when it is not an export. An export with other files in it is refused
    outright: --force would delete them."""
    if not path.is_dir() or path.is_symlink():
        return None
    try:
        config = json.loads((path / fmt.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != fmt.FORMAT:
        return None
    foreign = sorted(
        rel
        for rel in (p.relative_to(path).as_posix() for p in path.rglob("*"))
        if rel not in _EXPORT_FILES and rel != fmt.EXPERTS_DIR and not _EXPERT_FILE.fullmatch(rel)
    )
    if foreign:
        raise OutputError(
            f"{path} is an export but also holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
            "which no export holds: move that out first (nothing was written)"
        )
    provenance = config.get("provenance") if isinstance(config.get("provenance"), dict) else {}
    run_config = provenance.get("run_config") if isinstance(provenance.get("run_config"), dict) else {}
    return f"an export ({run_config.get('name', '?')}, step {provenance.get('step', '?')})"


_EXPORT_FILES = {fmt.CONFIG_FILE, fmt.TOKENIZER_FILE, fmt.DENSE_FILE, fmt.MANIFEST_FILE}
_EXPERT_FILE = re.compile(rf"{fmt.EXPERTS_DIR}/(encoder|decoder)\.layer\d+\.expert\d+\.safetensors")
