"""The peer MoE layers the engine is measured against, loaded with the same exported weights as our own policies:
DeepSpeed's `deepspeed.moe.layer.MoE` (static capacity, or padded to the largest count with drop_tokens=False) and
megatron-core's MoELayer (dropless, alltoall dispatcher). Each is a MoEBlock (moe_infer.moe.block) and is imported
only when asked for, so serving never needs megatron-core.
"""
