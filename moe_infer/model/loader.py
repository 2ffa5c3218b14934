"""Build the plain-torch model from an export directory, reading only what is asked for.

    model = load_model("exports/lm-tiny")                                        every expert
    model = load_model(path, experts=lambda stack, layer, expert: expert % 2 == rank)   this rank's experts only
    tensors = read_expert(path, "decoder", 2, 5)                                 one expert's weights, nothing else

Every file is checked against manifest.json (size and sha256) before it is used; experts that are not selected are
never opened. Tensors are checked by name and shape against config.json before they become parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from moe_infer import export_format as fmt
from moe_infer.model.config import ModelConfig
from moe_infer.model.moe import ExpertFFN
from moe_infer.model.transformer import DecoderLM, EncoderDecoder


@dataclass
class Export:
    """An opened export: its manifest and validated config.json (nothing else read yet)."""

    path: Path
    manifest: dict[str, dict[str, Any]]
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Export:
        path = Path(path)
        manifest = fmt.read_manifest(path)
        return cls(path=path, manifest=manifest, config=fmt.read_config(path, manifest))

    @cached_property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_export(self.config)

    def read_tensors(self, relpath: str) -> dict[str, torch.Tensor]:
        data = fmt.read_verified(self.path, relpath, self.manifest)
        try:
            return load_safetensors(data)
        except Exception as err:  # safetensors raises its own error types for malformed data
            raise fmt.ExportError(f"{self.path / relpath}: not a readable safetensors file ({err})") from None

    def tokenizer_bytes(self) -> bytes:
        return fmt.read_verified(self.path, self.config["tokenizer"]["file"], self.manifest)


def _as_export(export: str | Path | Export) -> Export:
    return export if isinstance(export, Export) else Export.open(export)


def read_expert(export: str | Path | Export, stack: str, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's tensors (fc1.weight, fc1.bias, fc2.weight, fc2.bias), read from its own file only."""
    export = _as_export(export)
    if (stack, layer, expert) not in set(fmt.expert_keys(export.config)):
        raise fmt.ExportError(f"{export.path}: there is no expert {expert} in {stack} layer {layer} (see config.json)")
    relpath = fmt.expert_file(stack, layer, expert)
    tensors = export.read_tensors(relpath)
    fmt.check_shapes(tensors, fmt.expert_shapes(export.config), str(export.path / relpath))
    return tensors


def build_model(cfg: ModelConfig) -> DecoderLM | EncoderDecoder:
    """The model skeleton (parameters on the meta device, no experts) for `cfg`."""
    return DecoderLM(cfg) if cfg.architecture == "decoder" else EncoderDecoder(cfg)


def load_model(
    export: str | Path | Export,
    experts: fmt.ExpertSelector | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> DecoderLM | EncoderDecoder:
    """The model in eval mode with the dense weights and the experts `experts(stack, layer, expert)` selects (all by
    default). `dtype=None` keeps the stored dtype."""
    export = _as_export(export)
    cfg = export.model_config
    model = build_model(cfg)

    def place(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.to(device=device, dtype=dtype or t.dtype) for name, t in tensors.items()}

    dense = export.read_tensors(fmt.DENSE_FILE)
    fmt.check_shapes(dense, fmt.dense_shapes(export.config), str(export.path / fmt.DENSE_FILE))
    model.load_state_dict(place(dense), strict=True, assign=True)
    stacks = {"decoder": model.decoder, **({"encoder": model.encoder} if cfg.architecture != "decoder" else {})}
    for stack, layer, expert in fmt.expert_keys(export.config):
        if experts is not None and not experts(stack, layer, expert):
            continue
        module = ExpertFFN(cfg)
        module.load_state_dict(place(read_expert(export, stack, layer, expert)), strict=True, assign=True)
        stacks[stack].layers[str(layer)].moe.experts[str(expert)] = module
    return model.eval().requires_grad_(False)
