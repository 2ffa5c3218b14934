"""Small random exports for the inference tests: the export format with random weights, no training, no megatron.

config = random_export_config("decoder", num_experts=8, topk=1, pre_softmax=True, hidden_size=16)
path = write_random_export(tmp_path / "lm", config, seed=0)
"""

from pathlib import Path

import torch

from moe_infer import export_format as fmt
from pipeline.convert.export import write_export


def random_export_config(
    architecture: str,
    *,
    num_experts: int = 4,
    topk: int = 2,
    pre_softmax: bool = False,
    router_bias: bool | None = None,
    **model,
) -> dict:
    """config.json of a small model; `model` overrides entries of its "model" section. The router has a bias when the
    model has biases (model.bias, default true), unless `router_bias` says otherwise."""
    d, heads, layers, enc = 32, 4, 4, (2 if architecture == "encoder-decoder" else 0)
    interval = 2
    stacks = {"decoder": layers, **({"encoder": enc} if enc else {})}
    return {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "architecture": architecture,
        "model": {
            "hidden_size": d,
            "ffn_hidden_size": 48,
            "num_attention_heads": heads,
            "head_dim": d // heads,
            "num_layers": layers,
            "encoder_layers": enc,
            "max_positions": 32,
            "vocab_size": 50,
            "norm": "layernorm",
            "norm_eps": 1e-5,
            "activation": "gelu",
            "position_embedding": "learned",
            "rope_base": 10000.0,
            "attention_scale": (d // heads) ** -0.5,
            "tie_embeddings": True,
            "lm_head_bias": architecture == "encoder-decoder",
            "dtype": "float32",
            "bias": True,
            "qk_norm": False,
            **model,
        },
        "moe": {
            "num_experts": num_experts,
            "topk": topk,
            "interval": interval,
            "moe_layers": {s: fmt.moe_layers(n, num_experts, interval) for s, n in stacks.items()},
            "capacity_fraction": 1.0,
            "router": {
                "score_function": "softmax",
                "pre_softmax": pre_softmax,
                "bias": model.get("bias", True) if router_bias is None else router_bias,
                "dtype": "fp32",
            },
        },
        "tokenizer": {"file": "tokenizer.model", "vocab_size": 50, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3},
        "provenance": {"source_checkpoint": "random", "step": 0},
    }


def write_random_export(path: Path, config: dict, seed: int = 0, tokenizer: bytes = b"a sentencepiece model") -> Path:
    gen = torch.Generator().manual_seed(seed)

    def random(shapes):
        return {name: torch.randn(shape, generator=gen) * 0.3 for name, shape in shapes.items()}

    experts = {key: random(fmt.expert_shapes(config)) for key in fmt.expert_keys(config)}
    path.mkdir(parents=True)
    write_export(path, config, random(fmt.dense_shapes(config)), experts, tokenizer)
    return path
