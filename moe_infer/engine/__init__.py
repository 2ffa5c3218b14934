"""The inference engine: an export served under expert parallelism with a chosen MoE implementation."""
