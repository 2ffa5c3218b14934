"""The runtime: an export served under expert parallelism (Engine), the ranks kept in lock step, generation,
translation, and the load recorder."""
