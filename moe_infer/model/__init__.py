"""The inference model in plain torch, built from an export directory (see moe_infer.export_format).

No megatron-core here: serving needs only torch and safetensors.
"""

from moe_infer.model.config import ModelConfig
from moe_infer.model.loader import Export, build_model, load_model, read_expert
from moe_infer.model.moe import DispatchPlan, ExpertFFN, MoELayer, Router, combine, dispatch
from moe_infer.model.transformer import Cache, DecoderLM, EncoderDecoder

__all__ = [
    "Cache",
    "DecoderLM",
    "DispatchPlan",
    "EncoderDecoder",
    "ExpertFFN",
    "Export",
    "MoELayer",
    "ModelConfig",
    "Router",
    "build_model",
    "combine",
    "dispatch",
    "load_model",
    "read_expert",
]
