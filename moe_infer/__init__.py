"""The inference engine: reads an export (moe_infer.export_format), builds the model in plain torch (moe_infer.model)
and serves it. Never imports megatron-core."""
