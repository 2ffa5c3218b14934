"""DeepSpeed 0.19.8 on a CPU-only torch: avoid its JIT-compile traps and fail clearly on what CPU cannot do.

- comm/torch.py build_shm_op: TorchBackend JIT-compiles a shared-memory comm op on first init when
  deepspeed.ops.__compatible_ops__ says it can (2-2.5 min on 2 cores). Marking it incompatible skips the build; gloo
  works unchanged.
- runtime/engine.py get_optimizer_configuration: a config optimizer "Adam"/"AdamW" builds FusedAdam (a ~84 s JIT
  compile) unless its params say "torch_adam": true, which selects torch.optim.Adam/AdamW.
- comm/comm.py init_distributed tries mpi4py when RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are missing:
  pipeline.platform.init_distributed fills them in for a launcher-less run and turns MPI discovery off.
- fp16 is not usable on CPU (DeepSpeed's CPU accelerator may still claim it where oneDNN has fp16): refuse it up front.
Nothing here changes anything when CUDA is available.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipeline.errors import PlatformError

SHM_COMM_OP = "deepspeed_shm_comm"
ADAM_TYPES = ("adam", "adamw")
# Config optimizer types whose DeepSpeed implementation is a JIT-compiled op with no torch fallback.
JIT_ONLY_OPTIMIZERS = ("lamb", "lion", "onebitadam", "zerooneadam", "onebitlamb")

# sha256 of inspect.getsource(upstream) in deepspeed 0.19.8.
# fmt: off
UPSTREAM_PINS: dict[str, str] = {
    "deepspeed.ops:__getattr__":
        "b6327fe22a4b2403329f3d9bfb87c9e813dd07fa09d7f012282858290f4f5edd",
    "deepspeed.comm.torch:build_shm_op":
        "2bf3cff9e3d1f05863cf534d298028210a541824eb8b9832ca37877183d60395",
    "deepspeed.comm.comm:init_distributed":
        "8551bc89539089652cef10899ea0a72bb1903ff3468222827c73b59c6bea574e",
    "deepspeed.runtime.engine:DeepSpeedEngine.get_optimizer_configuration":
        "ed96609a3a6500ff5db95ce0e0d7690c1bf5d17d90eac2337e0da18bf12e963d",
    "deepspeed.runtime.engine:DeepSpeedEngine._configure_basic_optimizer":
        "fdd125c71f9b392924d7e6757ed5406e9c52126c4c5d2491bc454f0bf8c9c8d4",
    "deepspeed.accelerator.cpu_accelerator:CPU_Accelerator.is_fp16_supported":
        "5f9f840c9be9b94738ba8eb88bd6627b3b16a6fedbfddb98f16a891be31ce531",
}
# fmt: on


def patch_deepspeed_for_cpu() -> list[str]:
    """Keep deepspeed.init_distributed from JIT-compiling its shm comm op. Returns the names applied ([] on CUDA).

    Must run before DeepSpeed's comm backend is created (init_distributed / initialize / init_inference). Idempotent.
    """
    if torch.cuda.is_available():
        return []
    try:
        import deepspeed.ops
    except ImportError as err:
        raise PlatformError(f"deepspeed is not installed (needed for inference): {err}") from err
    # ops/__init__.py builds this dict on first access and caches it in the module, so the edit persists.
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    return ["shm_comm_jit"]


def deepspeed_config_for_cpu(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DeepSpeed config that runs on this machine without JIT compiles; unchanged when CUDA is available.

    On CPU: an "Adam"/"AdamW" optimizer gets "torch_adam": true (torch.optim instead of FusedAdam); fp16, optimizers
    that only exist as compiled ops, and an explicit "torch_adam": false raise PlatformError.
    """
    if not isinstance(config, dict):
        raise PlatformError(f"DeepSpeed config must be a dict, got {type(config).__name__}")
    config = copy.deepcopy(config)
    if torch.cuda.is_available():
        return config
    if (config.get("fp16") or {}).get("enabled", False):
        raise PlatformError("DeepSpeed config: fp16.enabled is not supported on CPU; use bf16 or fp32")
    optimizer = config.get("optimizer")
    if not optimizer:
        return config
    kind = str(optimizer.get("type", "")).lower()
    if kind in JIT_ONLY_OPTIMIZERS:
        raise PlatformError(
            f"DeepSpeed config: optimizer.type {optimizer.get('type')!r} needs a compiled DeepSpeed op, "
            "unusable on CPU; use 'AdamW' or a torch optimizer"
        )
    if kind in ADAM_TYPES:
        params = optimizer.setdefault("params", {})
        if params.get("torch_adam") is False:
            raise PlatformError(
                "DeepSpeed config: optimizer.params.torch_adam is false, which JIT-compiles FusedAdam on CPU; "
                "remove it or set it to true"
            )
        params["torch_adam"] = True
    return config


def check_dtype_supported(dtype: torch.dtype):
    """DeepSpeed on CPU runs fp32 and bf16 only."""
    if not torch.cuda.is_available() and dtype == torch.float16:
        raise PlatformError("dtype float16 is not supported by DeepSpeed on CPU; use bfloat16 or float32")
