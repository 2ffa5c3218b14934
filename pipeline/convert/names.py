"""The one adapter from megatron-core's state_dict names to the export's, torchtitan style. The name map itself
(MEGATRON_*) is part of the export contract, moe_infer.export_format, which the megatron baseline reads too.

The model is read at EP=1, so `local_experts.K` is global expert K. Megatron layer indices count from 0, the export's
layer numbers from 1. Fused projections are split into the export's head-contiguous q, k, v:
    self-attention linear_qkv [H * (q, k, v) * Dh, D]: per head, its q rows, then k, then v
    cross-attention linear_kv [H * (k, v) * Dh, D]:    per head, its k rows, then v
T5's state_dict holds aliases of the same parameters (`position_embeddings.weight` is
`embedding.position_embeddings.weight`, `output_layer.*` is `lm_head.output_layer.*`): they must be equal and are
dropped. `_extra_state` entries (TransformerEngine fp8 metadata when present) must be empty and are dropped.
Every tensor that comes out is checked against the shape config.json's dims give it.

Shape legend: H heads, Dh head dim, D model dim.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from moe_infer import export_format as fmt
from pipeline.errors import CheckpointError

ALIASES = {
    "position_embeddings.weight": "embedding.position_embeddings.weight",
    "output_layer.weight": "lm_head.output_layer.weight",
    "output_layer.bias": "lm_head.output_layer.bias",
}


def _is_empty_extra_state(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, io.BytesIO):
        return len(value.getbuffer()) == 0
    return isinstance(value, torch.Tensor) and value.numel() == 0


def _drop_aliases_and_extra_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if name.endswith("._extra_state") or name == "_extra_state":
            if not _is_empty_extra_state(value):
                raise CheckpointError(f"{name}: holds extra state ({type(value).__name__}) this converter cannot carry")
            continue
        out[name] = value
    for alias, canonical in ALIASES.items():
        if alias in out and canonical in out:
            if out[alias].shape != out[canonical].shape or not torch.equal(out[alias], out[canonical]):
                raise CheckpointError(f"{alias} should be the same tensor as {canonical}, but they differ")
            del out[alias]
    return out


def _split_heads(name: str, tensor: torch.Tensor, parts: int, heads: int) -> list[torch.Tensor]:
    """[H * parts * Dh, ...] -> `parts` tensors [H * Dh, ...] (head-contiguous)."""
    rows = tensor.shape[0]
    if rows % (heads * parts):
        raise CheckpointError(
            f"{name} has shape {list(tensor.shape)}: its rows are not {parts} parts x {heads} heads x head_dim"
        )
    per_head = tensor.reshape(heads, parts, rows // (heads * parts), *tensor.shape[1:])
    return [per_head[:, i].reshape(rows // parts, *tensor.shape[1:]).contiguous() for i in range(parts)]


def export_tensors(
    state: dict[str, Any], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[fmt.ExpertKey, dict[str, torch.Tensor]]]:
    """(dense tensors, {(stack, layer, expert): expert tensors}) under the export's names, shapes checked."""
    heads = config["model"]["num_attention_heads"]
    dense: dict[str, torch.Tensor] = {}
    experts: dict[fmt.ExpertKey, dict[str, torch.Tensor]] = {}
    source: dict[str, str] = {}  # export name (or "file:name") -> megatron name, for error messages

    def put(target: dict, key: str, value: torch.Tensor, megatron_name: str, where: str = "") -> None:
        target[key] = value.detach().cpu().contiguous()
        source[f"{where}{key}"] = megatron_name

    for name, tensor in _drop_aliases_and_extra_state(state).items():
        if name in fmt.MEGATRON_TOP_RENAMES:
            put(dense, fmt.MEGATRON_TOP_RENAMES[name], tensor, name)
            continue
        match = fmt.MEGATRON_LAYER.fullmatch(name)
        if match is None:
            raise CheckpointError(f"unexpected tensor {name} {list(tensor.shape)} in the checkpoint: no export name")
        stack, layer, rest = match["stack"], int(match["index"]) + 1, match["rest"]
        prefix = f"{stack}.layers.{layer}"
        module, _, param = rest.rpartition(".")
        if expert := fmt.MEGATRON_EXPERT.fullmatch(rest):
            key = (stack, layer, int(expert["expert"]))
            where = f"{fmt.expert_file(*key)}:"
            put(experts.setdefault(key, {}), f"{expert['fc']}.{expert['param']}", tensor, name, where)
        elif module in fmt.MEGATRON_LAYER_RENAMES:
            put(dense, f"{prefix}.{fmt.MEGATRON_LAYER_RENAMES[module]}.{param}", tensor, name)
        elif module in fmt.MEGATRON_FUSED:
            target, parts = fmt.MEGATRON_FUSED[module]
            for part, piece in zip(parts, _split_heads(name, tensor, len(parts), heads), strict=True):
                put(dense, f"{prefix}.{target}.{part}.{param}", piece, name)
        else:
            raise CheckpointError(f"unexpected tensor {name} {list(tensor.shape)} in the checkpoint: no export name")

    _check(dense, fmt.dense_shapes(config), source, "", "dense weights")
    expected_experts = fmt.expert_keys(config)
    unexpected = sorted(set(experts) - set(expected_experts))
    if unexpected:
        stack, layer, expert = unexpected[0]
        raise CheckpointError(f"the checkpoint has expert {expert} in {stack} layer {layer}, which the model lacks")
    for key in expected_experts:
        where = f"{fmt.expert_file(*key)}:"
        _check(experts.get(key, {}), fmt.expert_shapes(config), source, where, f"expert {key[2]} of {key[0]} {key[1]}")
    return dense, experts


def _check(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    source: dict[str, str],
    where: str,
    what: str,
) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"the checkpoint has no tensor for {what}: {name} ({list(shape)}) is missing")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"tensor {source[where + name]} (export {name}) has shape {list(got)}, "
                f"expected {list(shape)} from the model's config"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(
            f"tensor {source[where + extra[0]]} (export {extra[0]}) is not part of the model described"
        )
