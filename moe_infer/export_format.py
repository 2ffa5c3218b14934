"""The export directory, format version 2: the contract between training (pipeline.convert writes it) and serving
(moe_infer reads it). Defined here once; the writer and the reader both import it. Version 1 (before model.bias and
model.qk_norm) still loads, as what it is: biases everywhere, no q/k norms (`_upgrade`).

    config.json       what the model is (below); validated by `validate_config`
    tokenizer.model   the sentencepiece model the model was trained with
    dense.safetensors every tensor that is not an expert's, under the export's own names (`dense_shapes`)
    experts/<stack>.layer<NN>.expert<EEEE>.safetensors
                      one file per (stack, MoE layer, expert) with fc1.weight, fc2.weight (and fc1.bias, fc2.bias with
                      model.bias): a serving rank opens only the files of the experts it holds (`expert_file`)
    manifest.json     {"format", "format_version", "files": {relative path: {"bytes", "sha256"}}}: every other file,
                      written last (else incomplete); every file is checked against it before use (`read_verified`)

config.json:
    format "moe-pipeline-export", format_version 2, architecture "decoder" (decoder-only LM) | "encoder-decoder" (MT)
    model: hidden_size D, ffn_hidden_size F, num_attention_heads H, head_dim D/H, num_layers (decoder),
           encoder_layers (0 for "decoder"), max_positions, vocab_size V, norm "layernorm" | "rmsnorm", norm_eps,
           activation "gelu" (exact, erf) | "swiglu" (fc1 rows: gate then up; silu(gate) * up),
           position_embedding "learned" | "rope" (rope_base, rotate-half, every head dim), attention_scale,
           tie_embeddings (logits use embed.tokens), lm_head_bias (a bias on the logits), dtype of the stored weights,
           bias (v2; false: no linear layer has a bias, router included), qk_norm (v2: self-attention's queries and
           keys each through a per-head norm of the model's kind over head_dim, before RoPE; cross-attention: none)
    moe:   num_experts E (0: every FFN dense), topk, interval, moe_layers {"decoder": [...], "encoder": [...]},
           capacity_fraction, router {score_function "softmax", pre_softmax, bias, dtype "fp32"}
           Routing: logits = x @ router.weight^T + router.bias in fp32; pre_softmax: softmax over E then top-k,
           else top-k of the logits then softmax over those k. An expert's output for a token is
           fc2(act(fc1(x)) * p) + fc2.bias * p with p the token's routing probability for it; a token's outputs
           from its k experts are summed.
    tokenizer:  file, vocab_size, pad_id, unk_id, bos_id, eos_id
    provenance: source_checkpoint, step, trained_ep_size, trained_world_size, run_config, training_git_revision,
                converter_git_revision, created_at, parity (the conversion's check against megatron-core)

`MEGATRON_*` below: megatron-core's names -> the export's (pipeline.convert writes, the megatron baseline reads back).

Layer numbers count from 1 within a stack everywhere in the export (tensor names, expert files, moe_layers), as the
run config's MoE interval does: with interval 2, layers 2, 4, ... are MoE layers. Expert ids count from 0.

Dense tensor names (n a layer number; [shape]):
    embed.tokens [V, D]                 embed.positions [max_positions, D] (learned positions only)
    <stack>.layers.<n>.attn_norm.weight [D] (.bias [D] with layernorm; every norm alike)
    <stack>.layers.<n>.attn.{q,k,v,out}.weight [D, D], .bias [D]   (q/k/v rows head-contiguous: head h is h*d:(h+1)*d)
    <stack>.layers.<n>.attn.{q,k}_norm.weight [head_dim] (.bias with layernorm)     (qk_norm only)
    decoder.layers.<n>.cross_norm, decoder.layers.<n>.cross_attn.{q,k,v,out}   (encoder-decoder only)
    <stack>.layers.<n>.mlp_norm
    <stack>.layers.<n>.mlp.fc1.weight [F or 2F, D], .bias; mlp.fc2.weight [D, F], .bias [D]   (dense layers)
    <stack>.layers.<n>.moe.router.weight [E, D], .bias [E]                                    (MoE layers)
    <stack>.final_norm                  lm_head.weight [V, D] (untied only)   lm_head.bias [V] (lm_head_bias only)
A linear layer's .bias (attention, mlp, the experts' fc1/fc2; the router's: router.bias) exists only with model.bias.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.atomic import file_sha256
from pipeline.errors import PipelineError

FORMAT = "moe-pipeline-export"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # what moe_infer loads; writers write FORMAT_VERSION
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
DENSE_FILE = "dense.safetensors"
MANIFEST_FILE = "manifest.json"
EXPERTS_DIR = "experts"
ARCHITECTURES = ("decoder", "encoder-decoder")
EXPERT_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")  # with model.bias; the weights alone without

ExpertKey = tuple[str, int, int]  # (stack, layer number from 1, expert id from 0)
ExpertSelector = Callable[[str, int, int], bool]


class ExportError(PipelineError):
    """An export directory is missing, incomplete, corrupt, or not of this format."""


# ---- file names ------------------------------------------------------------------------------------------------


def expert_file(stack: str, layer: int, expert: int) -> str:
    """The relative path of one expert's weights."""
    return f"{EXPERTS_DIR}/{stack}.layer{layer:02d}.expert{expert:04d}.safetensors"


def stacks(config: dict[str, Any]) -> list[tuple[str, int]]:
    """(stack name, number of layers), encoder first."""
    m = config["model"]
    if config["architecture"] == "encoder-decoder":
        return [("encoder", m["encoder_layers"]), ("decoder", m["num_layers"])]
    return [("decoder", m["num_layers"])]


def moe_layers(num_layers: int, num_experts: int, interval: int) -> list[int]:
    """The MoE layer numbers of a stack: every interval-th layer, counting from 1."""
    return [n for n in range(1, num_layers + 1) if num_experts and n % interval == 0]


def expert_keys(config: dict[str, Any]) -> list[ExpertKey]:
    moe = config["moe"]
    return [
        (stack, layer, expert)
        for stack, _ in stacks(config)
        for layer in moe["moe_layers"].get(stack, [])
        for expert in range(moe["num_experts"])
    ]


# ---- tensor names and shapes -------------------------------------------------------------------------------------


def _norm(prefix: str, m: dict[str, Any], size: int | None = None) -> dict[str, tuple[int, ...]]:
    d = size or m["hidden_size"]
    return {f"{prefix}.weight": (d,), **({f"{prefix}.bias": (d,)} if m["norm"] == "layernorm" else {})}


def _linear(prefix: str, out_dim: int, in_dim: int, m: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_dim, in_dim), **({f"{prefix}.bias": (out_dim,)} if m["bias"] else {})}


def fc1_rows(config: dict[str, Any]) -> int:
    m = config["model"]
    return 2 * m["ffn_hidden_size"] if m["activation"] == "swiglu" else m["ffn_hidden_size"]


def dense_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor dense.safetensors must hold, with its shape."""
    m, moe = config["model"], config["moe"]
    d, f, v = m["hidden_size"], m["ffn_hidden_size"], m["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"embed.tokens": (v, d)}
    if m["position_embedding"] == "learned":
        shapes["embed.positions"] = (m["max_positions"], d)
    cross = config["architecture"] == "encoder-decoder"
    for stack, num_layers in stacks(config):
        for n in range(1, num_layers + 1):
            p = f"{stack}.layers.{n}"
            shapes.update(_norm(f"{p}.attn_norm", m))
            for proj in ("q", "k", "v", "out"):
                shapes.update(_linear(f"{p}.attn.{proj}", d, d, m))
            if m["qk_norm"]:
                shapes.update(_norm(f"{p}.attn.q_norm", m, m["head_dim"]) | _norm(f"{p}.attn.k_norm", m, m["head_dim"]))
            if cross and stack == "decoder":
                shapes.update(_norm(f"{p}.cross_norm", m))
                for proj in ("q", "k", "v", "out"):
                    shapes.update(_linear(f"{p}.cross_attn.{proj}", d, d, m))
            shapes.update(_norm(f"{p}.mlp_norm", m))
            if n in moe["moe_layers"].get(stack, []):
                shapes[f"{p}.moe.router.weight"] = (moe["num_experts"], d)
                if moe["router"]["bias"]:
                    shapes[f"{p}.moe.router.bias"] = (moe["num_experts"],)
            else:
                shapes.update(_linear(f"{p}.mlp.fc1", fc1_rows(config), d, m))
                shapes.update(_linear(f"{p}.mlp.fc2", d, f, m))
        shapes.update(_norm(f"{stack}.final_norm", m))
    if not m["tie_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    if m["lm_head_bias"]:
        shapes["lm_head.bias"] = (v,)
    return shapes


def expert_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors of every expert file (all experts have the same shapes)."""
    m, d = config["model"], config["model"]["hidden_size"]
    return _linear("fc1", fc1_rows(config), d, m) | _linear("fc2", d, m["ffn_hidden_size"], m)


def check_shapes(tensors: dict[str, Any], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Exactly the expected names, each with its expected shape; else one ExportError naming the tensor."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ExportError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ExportError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ExportError(f"{where}: tensor {name} has shape {list(got)}, expected {list(shape)} from config.json")


# ---- megatron-core names -> export names (pipeline.convert writes with them; the megatron baseline reads them back) --
# megatron-core 0.16.1's state_dict read at EP=1 (`local_experts.K` is global expert K); its layer indices count from 0.

MEGATRON_LAYER = re.compile(r"(?P<stack>encoder|decoder)\.layers\.(?P<index>\d+)\.(?P<rest>.+)")
MEGATRON_EXPERT = re.compile(
    r"mlp\.experts\.local_experts\.(?P<expert>\d+)\.linear_(?P<fc>fc[12])\.(?P<param>weight|bias)"
)
# Within a layer: megatron module -> export module (a straight rename).
MEGATRON_LAYER_RENAMES = {
    "input_layernorm": "attn_norm",
    "self_attention.linear_proj": "attn.out",
    "self_attention.q_layernorm": "attn.q_norm",
    "self_attention.k_layernorm": "attn.k_norm",
    "pre_cross_attn_layernorm": "cross_norm",
    "cross_attention.linear_q": "cross_attn.q",
    "cross_attention.linear_proj": "cross_attn.out",
    "pre_mlp_layernorm": "mlp_norm",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
    "mlp.router": "moe.router",
}
# Fused projections: megatron module -> (export module, the parts in megatron's per-head order).
MEGATRON_FUSED = {
    "self_attention.linear_qkv": ("attn", ("q", "k", "v")),
    "cross_attention.linear_kv": ("cross_attn", ("k", "v")),
}
MEGATRON_TOP_RENAMES = {
    "embedding.word_embeddings.weight": "embed.tokens",
    "embedding.position_embeddings.weight": "embed.positions",
    "encoder.final_layernorm.weight": "encoder.final_norm.weight",
    "encoder.final_layernorm.bias": "encoder.final_norm.bias",
    "decoder.final_layernorm.weight": "decoder.final_norm.weight",
    "decoder.final_layernorm.bias": "decoder.final_norm.bias",
    "output_layer.weight": "lm_head.weight",  # GPT, untied
    "lm_head.output_layer.weight": "lm_head.weight",  # T5, untied
    "lm_head.output_layer.bias": "lm_head.bias",  # T5, tied
}


# ---- config.json -----------------------------------------------------------------------------------------------

# field path -> accepted types (bool is checked apart from int: True is not a layer count)
_STR, _INT, _NUM, _BOOL, _DICT = (str,), (int,), (float, int), (bool,), (dict,)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "format": _STR,
    "format_version": _INT,
    "architecture": _STR,
    **{f"model.{n}": _INT for n in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "head_dim")},
    **{f"model.{n}": _INT for n in ("num_layers", "encoder_layers", "max_positions", "vocab_size")},
    "model.norm": _STR,
    "model.norm_eps": _NUM,
    "model.activation": _STR,
    "model.position_embedding": _STR,
    "model.rope_base": _NUM,
    "model.attention_scale": _NUM,
    **dict.fromkeys(("model.tie_embeddings", "model.lm_head_bias"), _BOOL),
    "model.dtype": _STR,
    **dict.fromkeys(("model.bias", "model.qk_norm"), _BOOL),
    **dict.fromkeys(("moe.num_experts", "moe.topk", "moe.interval"), _INT),
    "moe.moe_layers": _DICT,
    "moe.capacity_fraction": _NUM,
    "moe.router.score_function": _STR,
    **dict.fromkeys(("moe.router.pre_softmax", "moe.router.bias"), _BOOL),
    "tokenizer.file": _STR,
    **{f"tokenizer.{n}": _INT for n in ("vocab_size", "pad_id", "unk_id", "bos_id", "eos_id")},
    "provenance": _DICT,
}
_CHOICES = {
    "architecture": ARCHITECTURES,
    "model.norm": ("layernorm", "rmsnorm"),
    "model.activation": ("gelu", "swiglu"),
    "model.position_embedding": ("learned", "rope"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "moe.router.score_function": ("softmax",),
}


def _field(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def validate_config(config: Any, source: str = CONFIG_FILE) -> dict[str, Any]:
    """Check format, version, every required field's type and the values that must agree; returns `config`."""

    def fail(path: str, message: str) -> ExportError:
        return ExportError(f"{source}: field {path}: {message}")

    if not isinstance(config, dict):
        raise ExportError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise fail("format", f"expected {FORMAT!r}, got {config.get('format')!r}: not a moe-pipeline export")
    if config.get("format_version") not in READABLE_VERSIONS:
        raise fail("format_version", f"expected one of {READABLE_VERSIONS}, got {config.get('format_version')!r}")
    _upgrade(config)
    for path, types in _REQUIRED.items():
        try:
            value = _field(config, path)
        except KeyError:
            raise fail(path, "is required") from None
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise fail(path, f"expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
        if path in _CHOICES and value not in _CHOICES[path]:
            raise fail(path, f"expected one of {', '.join(map(repr, _CHOICES[path]))}, got {value!r}")
    m, moe = config["model"], config["moe"]
    if m["head_dim"] * m["num_attention_heads"] != m["hidden_size"]:
        raise fail("model.head_dim", f"{m['head_dim']} x {m['num_attention_heads']} heads != hidden_size")
    if (config["architecture"] == "decoder") != (m["encoder_layers"] == 0):
        raise fail("model.encoder_layers", f"{m['encoder_layers']} does not fit architecture {config['architecture']}")
    if config["tokenizer"]["vocab_size"] != m["vocab_size"]:
        raise fail("tokenizer.vocab_size", f"{config['tokenizer']['vocab_size']} != model.vocab_size")
    if moe["router"]["bias"] and not m["bias"]:
        raise fail("moe.router.bias", "is true but model.bias is false (no linear biases anywhere, router included)")
    if moe["num_experts"] and not 1 <= moe["topk"] <= moe["num_experts"]:
        raise fail("moe.topk", f"must be in [1, num_experts={moe['num_experts']}], got {moe['topk']}")
    for stack, num_layers in stacks(config):
        layers = moe["moe_layers"].get(stack, [])
        if not isinstance(layers, list) or not all(isinstance(n, int) and 1 <= n <= num_layers for n in layers):
            raise fail(f"moe.moe_layers.{stack}", f"expected layer numbers in [1, {num_layers}], got {layers!r}")
    return config


def _upgrade(config: dict[str, Any]) -> None:
    """A version 1 config, in place, with the v2 fields that say what it is (format_version stays: what is on disk)."""
    if config["format_version"] == 1 and isinstance(config.get("model"), dict):
        config["model"].setdefault("bias", True)  # v1 models always had linear biases ...
        config["model"].setdefault("qk_norm", False)  # ... and never q/k norms


# ---- manifest and verified reads ------------------------------------------------------------------------------


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file, read in chunks."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def build_manifest(export_dir: Path) -> dict[str, Any]:
    """The manifest of every file under `export_dir` (the manifest itself excluded)."""
    files = {
        path.relative_to(export_dir).as_posix(): file_entry(path)
        for path in sorted(_walk(export_dir))
        if path.name != MANIFEST_FILE
    }
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield Path(dirpath) / name


def _read_file(path: Path) -> bytes:
    """Every read of an export's files goes through here (tests record it)."""
    with open(path, "rb") as f:
        return f.read()


def read_manifest(export_dir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's files: {relative path: {"bytes", "sha256"}}."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not export_dir.is_dir():
        raise ExportError(f"no export at {export_dir}")
    if not path.is_file():
        raise ExportError(f"{export_dir} is incomplete: it has no {MANIFEST_FILE} (a conversion that did not finish?)")
    try:
        manifest = json.loads(_read_file(path))
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} is corrupt: {err}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise ExportError(f"{path}: expected a {FORMAT} manifest with a 'files' mapping")
    return files


def read_verified(export_dir: Path, relpath: str, manifest: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of one export file, checked against the manifest (size, then sha256) before anyone uses them."""
    path = Path(export_dir) / relpath
    entry = manifest.get(relpath)
    if entry is None:
        raise ExportError(f"{path}: not listed in {MANIFEST_FILE}: the export is incomplete or not of this format")
    if not path.is_file():
        raise ExportError(f"{path} is missing: {MANIFEST_FILE} lists it ({entry['bytes']} bytes)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ExportError(f"corrupt export: {path} has {size} bytes, {MANIFEST_FILE} expects {entry['bytes']}")
    data = _read_file(path)
    actual = sha256_of(data)
    if actual != entry["sha256"]:
        raise ExportError(f"corrupt export: {path} has sha256 {actual}, {MANIFEST_FILE} expects {entry['sha256']}")
    return data


def read_config(export_dir: Path, manifest: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """config.json, verified against the manifest and validated."""
    manifest = read_manifest(export_dir) if manifest is None else manifest
    data = read_verified(export_dir, CONFIG_FILE, manifest)
    try:
        config = json.loads(data)
    except ValueError as err:
        raise ExportError(f"{Path(export_dir) / CONFIG_FILE} is not valid JSON: {err}") from None
    return validate_config(config, str(Path(export_dir) / CONFIG_FILE))
