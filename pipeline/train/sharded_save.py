"""Save megatron `dist_checkpointing` shards from inside the rank itself: no helper process can outlive it.

megatron-core 0.16.1's default save strategy (`TorchDistSaveShardedStrategy`) runs its asynchronous machinery even for
a synchronous `dist_checkpointing.save`: the first save starts a `multiprocessing` Manager server (a spawned process
kept for the life of the rank, `filesystem_async._get_write_results_queue`), and every save forks one writer process
per file bucket (`FileSystemWriterAsync.write_preloaded_data_multiproc`). When the rank is killed (kill -9, or the
launcher's SIGKILL), nothing tells the Manager: it stays behind with parent pid 1, waiting on a futex forever.

`SynchronousTorchDistSave` writes the same torch.distributed.checkpoint format through torch's own `FileSystemWriter`
in the calling thread, so a checkpoint save starts no process at all. Loading is unchanged (megatron's default load
strategy reads these files, at any EP degree).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

# megatron's name and version for the torch.distributed.checkpoint backend: loaders check them in metadata.json.
BACKEND, VERSION = "torch_dist", 1


class SynchronousTorchDistSave(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written synchronously by the calling process (no Manager, no fork)."""

    def __init__(self):
        super().__init__(BACKEND, VERSION, thread_count=1)

    def save(self, sharded_state_dict, checkpoint_dir: str | Path) -> None:
        # The same translation megatron's async_save does before handing the state to its writer processes.
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state = mcore_to_pyt_state_dict(state, False)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        dcp.save(pyt_state, storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1), planner=planner)
