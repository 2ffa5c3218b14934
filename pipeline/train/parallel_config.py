"""The parallel section of a run config: how training splits the model over its ranks.

    world = tp_size x dp       dense layers (attention, dense FFNs, embeddings, norms): split tp_size ways by megatron
                               tensor parallelism, replicated over the dp = world / tp_size data-parallel ranks
    world = ep_size x edp      experts: whole on one rank (expert tensor parallelism 1), split ep_size ways by expert
                               parallelism, replicated over the edp = world / ep_size expert-data-parallel ranks

So TP=2, EP=2 on 4 ranks: two TP pairs, each pair one data-parallel replica of the dense layers reading its own slice
of every batch, and every expert on two ranks. TP > 1 turns on megatron's sequence parallelism (its MoE layers refuse
TP without it in training): between the tensor-parallel matmuls each TP rank holds 1/tp_size of every sequence.

The world size itself is only known at start-up: `pipeline.train.model.init_model_parallel` checks it.
No torch here: the config loader imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class ParallelConfig:
    ep_size: int = 2  # expert-parallel degree: experts are split across this many ranks
    tp_size: int = 1  # tensor-parallel degree of the dense layers (megatron TP + sequence parallelism)

    def validate(self) -> None:
        for name in ("ep_size", "tp_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")

    def check_model(self, task: str, model, num_experts: int) -> None:
        """The checks across sections; `model` is the ModelConfig. Field names are relative to the run config."""
        if num_experts and num_experts % self.ep_size:
            raise ConfigError(
                "parallel.ep_size",
                f"must divide moe.num_experts={num_experts} (each rank holds the same number of experts), "
                f"got {self.ep_size}",
            )
        if self.tp_size == 1:
            return
        if task != "lm":
            # T5's encoder-decoder batches have per-batch lengths that sequence parallelism would have to pad to a
            # multiple of tp_size, and its cross-attention context is split along the sequence too: not wired up.
            raise ConfigError("parallel.tp_size", f"> 1 is supported for task 'lm' only, got {self.tp_size}")
        if num_experts and self.ep_size == 1 and model.bias:
            # megatron-core 0.16.1: with sequence parallelism and experts that are neither TP- nor EP-split, an
            # expert's linear_fc2 returns its input as is (a reduce-scatter over one rank) and MLP.forward adds the
            # expert bias to it in place: "RuntimeError: Output 0 of _ReduceScatterToSequenceParallelRegion is a view".
            raise ConfigError(
                "parallel.ep_size",
                f"must be >= 2 with parallel.tp_size={self.tp_size} and model.bias=true (megatron-core cannot add "
                "expert biases under tensor parallelism without expert parallelism); or set model.bias=false",
            )
        # Each TP rank holds 1/tp of the heads and FFN columns, and 1/tp of every sequence (sequence parallelism).
        for name in ("num_attention_heads", "hidden_size", "ffn_hidden_size", "seq_length"):
            value = getattr(model, name)
            if value % self.tp_size:
                raise ConfigError("parallel.tp_size", f"must divide model.{name}={value}, got {self.tp_size}")

    def check_trainable(self, model, num_experts: int) -> None:
        """What megatron-core 0.16.1 can train, beyond what it can load (conversion builds any config at EP=1)."""
        if num_experts and self.ep_size == 1 and model.bias:
            # An expert's linear_fc2 output comes back from a one-rank reduce as its input, and MLP.forward adds the
            # expert bias to it in place: "RuntimeError: Output 0 of _ReduceFromModelParallelRegion is a view".
            raise ConfigError(
                "parallel.ep_size",
                "must be >= 2 to train experts with biases (model.bias=true): megatron-core 0.16.1 cannot add expert "
                "biases at ep_size 1; run on 2 ranks, or train a config with model.bias=false (lm-qwen3-tiny)",
            )

    def check_world(self, world_size: int) -> None:
        """`world_size` ranks can hold this layout (dense: tp x dp; experts: ep x edp)."""
        for name in ("tp_size", "ep_size"):
            degree = getattr(self, name)
            if world_size % degree:
                raise ConfigError(f"parallel.{name}", f"must divide the number of ranks ({world_size}), got {degree}")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.tp_size
