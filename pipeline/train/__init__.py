"""Training: megatron-core MoE models (LM and MT) with expert parallelism, the loop, checkpoints, routing traces."""
