"""Silence the warnings every run here would print and no user can act on, so real ones stand out.

Each is a fact of this platform, documented in shared/PLATFORM.md: no TransformerEngine or Apex (megatron falls back to
torch implementations), megatron config defaults it announces, and torch deprecations inside dist_checkpointing.
"""

import warnings

KNOWN_WARNINGS = (
    (UserWarning, r".*Transformer Engine and Apex are not installed.*"),
    (UserWarning, r".*Apex is not installed.*"),
    (UserWarning, r".*moe_ffn_hidden_size is not set, using ffn_hidden_size instead.*"),
    (UserWarning, r".*full scope is deprecated.*"),
    (FutureWarning, r".*torch.distributed.all_gather_into_tensor. is deprecated.*"),
    # Loading a checkpoint (resume, convert): megatron's torch_dist format is built on ShardedTensor.
    (FutureWarning, r".*Please use DTensor instead and we are deprecating ShardedTensor.*"),
    (FutureWarning, r".*`load_state_dict` is deprecated and will be removed in future versions.*"),
)


def quiet_known_warnings() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
