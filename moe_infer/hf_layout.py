"""An export as transformers' Qwen3MoeForCausalLM: which exports have its structure, its config.json, and where each
exported tensor goes, in the layout of the Hugging Face hub's Qwen3-MoE checkpoints (one tensor per expert
projection; transformers >= 5 fuses them into its grouped experts when it loads them, vLLM and SGLang read them as
they are). pipeline.convert.hf writes a Hugging Face directory with it; the transformers baseline of the benchmarks
(moe_infer.bench.hf_baseline) loads the same weights through it. Plain data: no transformers import here.

    mismatches(config)                       [] for a Qwen3-MoE-shaped export, else one "option value (why)" each
    hf_config(config)                        config.json of the Hugging Face directory
    dense_tensors(config, dense)             {transformers name: tensor} of dense.safetensors' tensors
    expert_tensors(layer, expert, tensors)   {transformers name: tensor} of one expert's
    write_weights(directory, config, dense, experts)   config.json and model.safetensors

Names (n: the export's layer number from 1, i = n - 1; e: expert id):
    embed.tokens                          model.embed_tokens.weight
    decoder.layers.n.attn_norm.weight     model.layers.i.input_layernorm.weight
    decoder.layers.n.attn.{q,k,v,out}     model.layers.i.self_attn.{q,k,v,o}_proj    (head-contiguous rows in both)
    decoder.layers.n.attn.{q,k}_norm      model.layers.i.self_attn.{q,k}_norm
    decoder.layers.n.mlp_norm.weight      model.layers.i.post_attention_layernorm.weight
    decoder.layers.n.mlp.fc1 [2F, D]      model.layers.i.mlp.gate_proj = rows :F, mlp.up_proj = rows F:  (megatron's
                                          SwiGLU fc1 is [gate; up]: silu(gate) * up)
    decoder.layers.n.mlp.fc2              model.layers.i.mlp.down_proj
    decoder.layers.n.moe.router.weight    model.layers.i.mlp.gate.weight
    expert e's fc1 / fc2                  model.layers.i.mlp.experts.e.{gate_proj, up_proj} / .down_proj
    decoder.final_norm.weight             model.norm.weight
    lm_head.weight (untied only)          lm_head.weight        (tied: tie_word_embeddings true)

What makes the two the same model (tests/test_convert_hf.py checks it against transformers):
    router   ours: top-k of the logits, softmax over those k (router.pre_softmax false) = theirs: softmax over E,
             top-k, renormalised (norm_topk_prob true); pre_softmax true = norm_topk_prob false
    layers   MoE on every interval-th layer counting from 1 = decoder_sparse_step ((i + 1) % step == 0); any other
             set of MoE layers through mlp_only_layers
    the rest plain multi-head attention (num_key_value_heads = heads) scaled by 1/sqrt(head_dim), per-head RMSNorm
             on q and k before rotate-half RoPE over the whole head dim (rope_base = rope_theta), RMSNorm with one eps
             everywhere, SwiGLU FFNs of one width (intermediate_size = moe_intermediate_size = F), no bias anywhere
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_infer import export_format as fmt

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Within a layer: the export's name -> transformers'. fc1 (split in two) and the experts are apart.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "moe.router.weight": "mlp.gate.weight",
}
FC1_NAMES = ("gate_proj.weight", "up_proj.weight")  # megatron's SwiGLU fc1 rows: gate, then up
TOP_NAMES = {
    "embed.tokens": "model.embed_tokens.weight",
    "decoder.final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def mismatches(config: dict[str, Any]) -> list[str]:
    """Each option of the export that Qwen3-MoE has no equivalent for, as "field value (what Qwen3-MoE has)"."""
    m, moe = config["model"], config["moe"]
    found = []

    def need(ok: bool, field: str, value: Any, why: str) -> None:
        if not ok:
            found.append(f"{field} {json.dumps(value)} ({why})")

    need(config["architecture"] == "decoder", "architecture", config["architecture"], "Qwen3-MoE is decoder-only")
    need(m["norm"] == "rmsnorm", "model.norm", m["norm"], "Qwen3-MoE uses RMSNorm")
    need(m["activation"] == "swiglu", "model.activation", m["activation"], "Qwen3-MoE's FFNs are SwiGLU")
    need(m["position_embedding"] == "rope", "model.position_embedding", m["position_embedding"], "Qwen3-MoE uses RoPE")
    need(not m["bias"], "model.bias", m["bias"], "Qwen3-MoE has no linear biases")
    need(not moe["router"]["bias"], "moe.router.bias", moe["router"]["bias"], "Qwen3-MoE's router has no bias")
    need(not m["lm_head_bias"], "model.lm_head_bias", m["lm_head_bias"], "Qwen3-MoE's lm_head has no bias")
    need(m["qk_norm"], "model.qk_norm", m["qk_norm"], "Qwen3-MoE always normalises q and k per head")
    scale = 1.0 / math.sqrt(m["head_dim"])
    need(
        math.isclose(m["attention_scale"], scale, rel_tol=1e-6),
        "model.attention_scale",
        m["attention_scale"],
        f"Qwen3-MoE scales attention by 1/sqrt(head_dim) = {scale:.6g}",
    )
    need(moe["num_experts"] > 0, "moe.num_experts", moe["num_experts"], "a dense model: no MoE layer to map")
    router = moe["router"]["score_function"]
    need(router == "softmax", "moe.router.score_function", router, "Qwen3-MoE's router is a softmax")
    return found


def _run_config(config: dict[str, Any], section: str, key: str, default: Any) -> Any:
    """A training setting from the export's provenance (the run config), if the export carries it."""
    saved = config.get("provenance", {}).get("run_config") or {}
    return (saved.get(section) or {}).get(key, default)


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json of the Hugging Face directory, in the hub's Qwen3-MoE layout (`rope_theta`, `num_experts`,
    `torch_dtype`: what transformers 4.x, 5.x, vLLM and SGLang all read). Needs `mismatches(config) == []`."""
    m, moe, tok = config["model"], config["moe"], config["tokenizer"]
    num_layers, interval = m["num_layers"], moe["interval"]
    layers = moe["moe_layers"].get("decoder", [])
    if layers == fmt.moe_layers(num_layers, moe["num_experts"], interval):
        step, dense_only = interval, []
    else:  # an explicit set: every layer is a candidate, the others are listed
        step, dense_only = 1, [n - 1 for n in range(1, num_layers + 1) if n not in layers]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": m["vocab_size"],
        "hidden_size": m["hidden_size"],
        "intermediate_size": m["ffn_hidden_size"],
        "moe_intermediate_size": m["ffn_hidden_size"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_attention_heads"],
        "head_dim": m["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": m["max_positions"],
        "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rope_base"],
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": m["tie_embeddings"],
        "num_experts": moe["num_experts"],
        "num_experts_per_tok": moe["topk"],
        "decoder_sparse_step": step,
        "mlp_only_layers": dense_only,
        "norm_topk_prob": not moe["router"]["pre_softmax"],
        "output_router_logits": False,
        "router_aux_loss_coef": _run_config(config, "moe", "aux_loss_coeff", 0.001),
        "initializer_range": _run_config(config, "model", "init_std", 0.02),
        "use_cache": True,
        "bos_token_id": tok["bos_id"],
        "eos_token_id": tok["eos_id"],
        "pad_token_id": tok["pad_id"],
        "torch_dtype": m["dtype"],
    }


def _layer_prefix(name: str) -> tuple[int, str] | None:
    """'decoder.layers.3.attn.q.weight' -> (3, 'attn.q.weight'); None for a tensor outside the layers."""
    stack, _, rest = name.partition(".layers.")
    if stack != "decoder" or not rest:
        return None
    number, _, inner = rest.partition(".")
    return int(number), inner


def dense_tensors(config: dict[str, Any], dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dense.safetensors' tensors under transformers' names (fc1 split into gate_proj and up_proj)."""
    f = config["model"]["ffn_hidden_size"]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
            continue
        located = _layer_prefix(name)
        if located is None:
            raise fmt.ExportError(f"tensor {name} has no Qwen3-MoE name")
        number, inner = located
        prefix = f"model.layers.{number - 1}."
        if inner == "mlp.fc1.weight":
            out[prefix + "mlp." + FC1_NAMES[0]], out[prefix + "mlp." + FC1_NAMES[1]] = tensor[:f], tensor[f:]
        elif inner in LAYER_NAMES:
            out[prefix + LAYER_NAMES[inner]] = tensor
        else:
            raise fmt.ExportError(f"tensor {name} has no Qwen3-MoE name")
    return out


def expert_tensors(layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's fc1/fc2 (decoder layer number `layer`, from 1) under transformers' names."""
    prefix = f"model.layers.{layer - 1}.mlp.experts.{expert}."
    fc1 = tensors["fc1.weight"]
    gate, up = fc1[: fc1.shape[0] // 2], fc1[fc1.shape[0] // 2 :]
    return {prefix + FC1_NAMES[0]: gate, prefix + FC1_NAMES[1]: up, prefix + "down_proj.weight": tensors["fc2.weight"]}


def write_weights(
    directory: Path,
    config: dict[str, Any],
    dense: dict[str, torch.Tensor],
    experts: Iterable[tuple[fmt.ExpertKey, dict[str, torch.Tensor]]],
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json (hf_config and `extra_config`) and model.safetensors into `directory`; returns the config."""
    problems = mismatches(config)
    if problems:
        raise fmt.ExportError(f"not a Qwen3-MoE model: {'; '.join(problems)}")
    tensors = dense_tensors(config, dense)
    for (_, layer, expert), expert_weights in experts:
        tensors.update(expert_tensors(layer, expert, expert_weights))
    # safetensors refuses views that share storage (fc1's halves): each tensor gets its own.
    weights = {name: tensor.contiguous().clone() for name, tensor in tensors.items()}
    save_file(weights, str(Path(directory) / WEIGHTS_FILE), metadata={"format": "pt"})
    hf = {**hf_config(config), **(extra_config or {})}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    return hf
