"""megatron-core MoE models for the two tasks: a GPT decoder-only LM and a T5-style encoder-decoder for MT.

Both are built from megatron's *local* (non-TransformerEngine) layer specs, one spec per layer, so that exactly the
layers `cfg.moe.is_moe_layer(n)` says (n counted from 1 within each stack) get the MoE MLP (router + SequentialMLP
experts, dropless) and the others a dense MLP. megatron's own `moe_layer_freq=N` puts MoE on layers 1, N+1, ...
(0-based `i % N == 0`), not on N, 2N, ... as the paper and our config mean, so it is only given as the explicit list.

Forward passes always get explicit boolean attention masks (True = masked out): megatron's default causal mask is
built on device "cuda", and T5Model.forward drops the padding masks that keep the MoE aux losses off padding tokens.
The MT forward therefore drives T5Model's submodules (embedding, encoder, decoder, lm_head) itself.

The MoE load-balancing and z-losses are not part of what `model_loss` returns: megatron attaches them to the router
outputs through MoEAuxLossAutoScaler, whose backward adds d(aux)/d(router) * MoEAuxLossAutoScaler's scale (default 1)
to the gradient of any loss built on the model output. `moe_aux_losses` reads their values for logging.

Shape legend: B batch, S sequence (Ss source, St target), D hidden size, V vocabulary, E experts.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PlatformError
from pipeline.platform import patch_megatron_for_cpu
from pipeline.platform.megatron_config import transformer_config as megatron_transformer_config
from pipeline.train.batch import LMBatch, MTBatch

# What moe_aux_losses reads, set by the last build_model: the names megatron's router logs its enabled losses under
# in the layer-wise tracker (router.py), and the model's number of MoE layers (the tracker sums over layers).
_aux_losses = {"names": [], "moe_layers": 0}
_AUX_LOSS_COEFFS = {"load_balancing_loss": "aux_loss_coeff", "z_loss": "z_loss_coeff"}


def init_model_parallel(cfg: RunConfig) -> None:
    """Expert-parallel process groups (TP=PP=1, DP=world) and the seeded RNG tracker. Collective; idempotent."""
    patch_megatron_for_cpu()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise PlatformError("torch.distributed is not initialized: call pipeline.platform.init_distributed first")
    world, ep = dist.get_world_size(), cfg.parallel.ep_size
    if world % ep != 0:
        raise ConfigError("parallel.ep_size", f"must divide the number of ranks ({world}), got {ep}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    elif parallel_state.get_expert_model_parallel_world_size() != ep:
        raise PlatformError(
            f"model parallelism is already initialized with EP={parallel_state.get_expert_model_parallel_world_size()}"
            f", cannot use parallel.ep_size={ep} in the same process"
        )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)


def transformer_config(cfg: RunConfig, num_layers: int):
    """The megatron TransformerConfig of one stack (encoder or decoder) of `cfg`."""
    m, moe = cfg.model, cfg.moe
    bf16 = cfg.train.dtype == "bf16"
    settings = dict(
        num_layers=num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_std,
        normalization="RMSNorm" if m.norm == "rmsnorm" else "LayerNorm",
        add_bias_linear=m.bias,  # every linear layer: attention, FFNs, experts and the router
        qk_layernorm=m.qk_norm,  # the norm modules themselves are put into the layer specs (_with_torch_norms)
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # False: the expert weights come from the per-EP-rank RNG state (they differ across ranks), dense weights from
        # the shared one (identical given the same seed). True would give every EP rank the same experts.
        use_cpu_initialization=False,
    )
    if moe.num_experts:
        settings.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_router_pre_softmax=moe.router_pre_softmax,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff or None,  # None skips the z-loss; 0.0 would still compute it
            moe_token_dispatcher_type=moe.dispatcher,
            moe_layer_freq=[int(moe.is_moe_layer(n)) for n in range(1, num_layers + 1)],
            expert_model_parallel_size=cfg.parallel.ep_size,
        )
    # Fusions off, the activation, SequentialMLP experts and an fp32 router: pipeline.platform.megatron_config.
    return megatron_transformer_config(activation=m.activation, **settings)


def _with_torch_norms(layer_spec, qk_norm: bool):
    """The layer spec with every norm a torch LayerNorm/RMSNorm (per config.normalization), and with `qk_norm` the
    self-attention's per-head query and key norms (megatron's cross-attention has none).

    megatron's local specs take apex's FusedLayerNorm when apex imports (no RMSNorm, no CPU) and its T5 block specs
    take TENorm, which is None without TransformerEngine: the final norm is then silently dropped. Neither T5 spec
    takes a qk_layernorm argument, so the q/k norms are set here for both models alike.
    """
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    sub = layer_spec.submodules
    norms = {
        name: WrappedTorchNorm
        for name in ("input_layernorm", "pre_cross_attn_layernorm", "pre_mlp_layernorm")
        if getattr(sub, name) is not IdentityOp
    }
    if qk_norm:
        attention = sub.self_attention
        qk = dataclasses.replace(attention.submodules, q_layernorm=WrappedTorchNorm, k_layernorm=WrappedTorchNorm)
        norms["self_attention"] = dataclasses.replace(attention, submodules=qk)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, **norms))


def _block_spec(cfg: RunConfig, base_layer_spec, num_layers: int):
    """TransformerBlockSubmodules: `base_layer_spec` per layer, its MLP swapped for the MoE MLP on MoE layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    dense = _with_torch_norms(base_layer_spec, cfg.model.qk_norm)
    specs = [dense] * num_layers
    if cfg.moe.num_experts:
        moe_mlp = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts, moe_grouped_gemm=False).submodules.mlp
        moe = dataclasses.replace(dense, submodules=dataclasses.replace(dense.submodules, mlp=copy.deepcopy(moe_mlp)))
        specs = [moe if cfg.moe.is_moe_layer(n) else dense for n in range(1, num_layers + 1)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=WrappedTorchNorm)


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """GPTModel (task lm) or T5Model (task mt) on this rank's device, in train mode. Needs init_model_parallel."""
    patch_megatron_for_cpu()
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.T5 import t5_spec
    from megatron.core.models.T5.t5_model import T5Model
    from megatron.core.process_groups_config import ProcessGroupCollection

    # Re-seed so the weights depend on the seed alone, not on what used the RNG since init_model_parallel.
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    m = cfg.model
    positions = "rope" if m.position_embedding == "rope" else "learned_absolute"
    if cfg.task == "lm":
        model = GPTModel(
            transformer_config(cfg, m.num_layers),
            _block_spec(cfg, get_gpt_layer_local_spec(), m.num_layers),
            vocab_size=vocab_size,
            max_sequence_length=m.seq_length,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type=positions,
        )
    else:
        model = T5Model(
            config=transformer_config(cfg, m.num_layers),
            encoder_config=transformer_config(cfg, m.encoder_layers),
            transformer_encoder_layer_spec=_block_spec(cfg, t5_spec.encoder_model_with_local_spec(), m.encoder_layers),
            transformer_decoder_layer_spec=_block_spec(cfg, t5_spec.decoder_model_with_local_spec(), m.num_layers),
            vocab_size=vocab_size,
            max_sequence_length=m.seq_length,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type=positions,
            # T5Model asks parallel_state for the TP/CP/PP groups only; MoE layers also need the EP groups.
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        )
    for name, param in model.named_parameters():
        # megatron marks expert params `allreduce=False` only when EP > 1; this marker holds at any EP degree.
        param.is_moe_expert = ".mlp.experts." in name
    stacks = [m.num_layers] + ([m.encoder_layers] if cfg.task == "mt" else [])
    names = [name for name, coeff in _AUX_LOSS_COEFFS.items() if getattr(cfg.moe, coeff) > 0 and cfg.moe.num_experts]
    _aux_losses.update(names=names, moe_layers=sum(cfg.moe.is_moe_layer(n) for d in stacks for n in range(1, d + 1)))
    _init_aux_loss_tracker(names, max(stacks), _device())
    # params_dtype covers megatron's own linear and embedding layers, not the torch norms: cast the rest, as megatron's
    # Float16Module does (without its fp32 main-param copy: plain bf16 weights).
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    return model.to(device=_device(), dtype=dtype).train()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _init_aux_loss_tracker(names: list[str], num_layers: int, device: torch.device) -> None:
    # The tracker is a [num_layers] tensor per loss, created by the first layer that logs with *its stack's* depth and
    # indexed by layer_number - 1: a decoder deeper than the encoder would index past it. Size it for the deepest.
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    for name in names:
        entry = tracker.setdefault(name, {"reduce_group": None, "avg_group": None, "reduce_group_has_dp": False})
        if "values" not in entry or entry["values"].numel() < num_layers:
            entry["values"] = torch.zeros(num_layers, device=device)


def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S] bool, True above the diagonal (future positions masked out)."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _positions(ids_BS: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids_BS.shape[1], device=ids_BS.device).expand_as(ids_BS)


def encode(model, src_BS: torch.Tensor, src_pad_BS: torch.Tensor) -> torch.Tensor:
    """T5 encoder output [Ss, B, D]. Padding keys are masked; the padding mask also keeps pads out of the aux loss."""
    x_SBD = model.embedding(input_ids=src_BS, position_ids=_positions(src_BS))
    rope = model.rotary_pos_emb(src_BS.shape[1]) if model.position_embedding_type == "rope" else None
    return model.encoder(
        hidden_states=x_SBD,
        attention_mask=src_pad_BS[:, None, None, :],  # [B, 1, 1, Ss]: every query ignores padded keys
        rotary_pos_emb=rope,
        padding_mask=src_pad_BS,
    )


def decode(model, enc_SBD, tgt_in_BS, src_pad_BS, tgt_pad_BS=None) -> torch.Tensor:
    """T5 decoder logits [B, St, V] (the output dtype) from the encoder output of `encode`."""
    x_SBD = model.embedding(input_ids=tgt_in_BS, position_ids=_positions(tgt_in_BS))
    rope = model.rotary_pos_emb(tgt_in_BS.shape[1]) if model.position_embedding_type == "rope" else None
    h_SBD = model.decoder(
        hidden_states=x_SBD,
        attention_mask=_causal_mask(tgt_in_BS.shape[1], tgt_in_BS.device),
        context=enc_SBD,
        context_mask=src_pad_BS[:, None, None, :],
        rotary_pos_emb=rope,
        padding_mask=tgt_pad_BS,
    )
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    return model.lm_head(h_SBD, word_embeddings_weight=weight).transpose(0, 1)


def model_logits(model, batch: LMBatch | MTBatch) -> torch.Tensor:
    """[B, S, V] fp32 logits (S = St for MT)."""
    if isinstance(batch, MTBatch):
        enc_SBD = encode(model, batch.src, batch.src_pad)
        return decode(model, enc_SBD, batch.tgt_in, batch.src_pad, batch.tgt_pad).float()
    tokens_BS = batch.tokens
    logits_BSV = model(
        input_ids=tokens_BS,
        position_ids=_positions(tokens_BS),
        attention_mask=_causal_mask(tokens_BS.shape[1], tokens_BS.device),
    )
    return logits_BSV.float()


def model_loss(model, batch: LMBatch | MTBatch) -> torch.Tensor:
    """Sum of the token cross-entropies at loss_mask positions (fp32 scalar); the caller divides by the token count."""
    logits_BSV = model_logits(model, batch)
    per_token = F.cross_entropy(logits_BSV.flatten(0, 1), batch.labels.flatten(), reduction="none")
    return (per_token * batch.loss_mask.flatten().float()).sum()


def moe_aux_losses() -> dict[str, float]:
    """MoE aux losses (without their coefficients) logged since the last call, averaged over MoE layers; clears them.

    Local to this rank (each rank's router loss covers its own tokens). Only training forwards with grad log them.
    """
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    out = {
        name: tracker[name]["values"].sum().item() / max(1, _aux_losses["moe_layers"])
        for name in _aux_losses["names"]
        if name in tracker
    }
    clear_aux_losses_tracker()
    return out


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """An expert weight (held by one EP rank, synced over the expert-data-parallel group only)."""
    return bool(getattr(param, "is_moe_expert", False)) or getattr(param, "allreduce", True) is False


def sharded_state_dict(model) -> dict:
    """The dist_checkpointing view of the model: experts stacked over the EP group, dense tensors replicated."""
    return model.sharded_state_dict()
