"""The platform layer: device and backend choice, threads per rank, torch.distributed start-up, and the substitutes that
let megatron-core 0.16.1 and DeepSpeed 0.19.8 run on a CPU-only torch. With CUDA present the substitutes do nothing.

Typical entry point:

    platform = detect_platform()                 # cuda+nccl when present, else cpu+gloo
    set_threads_per_rank()
    tune_host_malloc()                           # reuse freed host memory (no page faults per MB-sized tensor)
    patch_megatron_for_cpu()                     # before building megatron models (training)
    info = init_distributed(platform)            # or use_deepspeed=True for serving; watches the launcher
"""

from pipeline.platform.deepspeed_cpu import check_dtype_supported, deepspeed_config_for_cpu, patch_deepspeed_for_cpu
from pipeline.platform.device import (
    DistInfo,
    Platform,
    detect_platform,
    free_port,
    init_distributed,
    local_world_size,
    set_threads_per_rank,
)
from pipeline.platform.host_memory import tune_host_malloc
from pipeline.platform.launcher import LauncherWatch, watch_launcher
from pipeline.platform.megatron_cpu import patch_megatron_for_cpu
from pipeline.platform.warnings import quiet_known_warnings

__all__ = [
    "DistInfo",
    "LauncherWatch",
    "Platform",
    "check_dtype_supported",
    "deepspeed_config_for_cpu",
    "detect_platform",
    "free_port",
    "init_distributed",
    "local_world_size",
    "patch_deepspeed_for_cpu",
    "patch_megatron_for_cpu",
    "quiet_known_warnings",
    "set_threads_per_rank",
    "tune_host_malloc",
    "watch_launcher",
]
