"""The server's figures, in Prometheus form (GET /metrics, prometheus_client) and, at an interval, in the run's W&B
run (offline by default; `--run-dir`).

Requests (names as vLLM's, with the `moe_` prefix):
    moe_time_to_first_token_seconds      histogram: arrival -> the first token handed to the client
    moe_inter_token_latency_seconds      histogram: between two deliveries of a request's tokens (one per step)
    moe_e2e_request_latency_seconds      histogram: arrival -> the end
    moe_request_queue_time_seconds       histogram: arrival -> handed to a rank (it joins that rank's batch at once)
    moe_num_requests_running / _waiting  gauges: on a rank / queued at rank 0
    moe_prompt_tokens_total, moe_generation_tokens_total, moe_request_success_total{finished_reason},
    moe_request_errors_total{status}, moe_engine_steps and moe_engine_prefill_steps (the serving loop's steps)
MoE layers (every rank's figures added up: the group's; runtime.metering):
    moe_layer_expert_pairs_total{layer,expert}    (token, expert) pairs routed to each expert (dynamic, static)
    moe_layer_routed_pairs_total{layer}, moe_layer_dropped_pairs_total{layer}
    moe_layer_all_to_all_bytes_total{layer,direction}
    moe_buffer_hits_total, _misses_total, _copied_bytes_total, _stall_seconds_total {layer}   (expert buffering)
Online re-balancing (runtime.rebalance; every rank computes the same, rank 0's are taken):
    moe_placement_balancedness{layer}     gauge: the last re-fit window's mean / max rank load under the placement
                                          then in force (1 is even)
    moe_placement_moves_total{layer}, moe_placement_moved_bytes_total{layer}, moe_placement_refits_total
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "moe_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "moe_inter_token_latency_seconds", "Inter-token latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "moe_e2e_request_latency_seconds", "End-to-end latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "moe_request_queue_time_seconds", "Time queued at rank 0", buckets=LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("moe_num_requests_running", "Requests on a rank", registry=r)
        self.waiting = Gauge("moe_num_requests_waiting", "Requests queued at rank 0", registry=r)
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt tokens of requests handed to a rank", registry=r)
        self.generation_tokens = Counter("moe_generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("moe_request_success", "Requests finished", ["finished_reason"], registry=r)
        self.errors = Counter("moe_request_errors", "Requests answered with an error", ["status"], registry=r)
        self.expert_pairs = Counter(
            "moe_layer_expert_pairs", "Pairs routed to an expert", ["layer", "expert"], registry=r
        )
        self.routed = Counter("moe_layer_routed_pairs", "(token, expert) pairs routed", ["layer"], registry=r)
        self.dropped = Counter("moe_layer_dropped_pairs", "Pairs dropped past capacity", ["layer"], registry=r)
        self.a2a = Counter("moe_layer_all_to_all_bytes", "All-to-all bytes", ["layer", "direction"], registry=r)
        self.hits = Counter("moe_buffer_hits", "Expert cache hits", ["layer"], registry=r)
        self.misses = Counter("moe_buffer_misses", "Expert cache misses", ["layer"], registry=r)
        self.copied = Counter("moe_buffer_copied_bytes", "Expert bytes copied to the device", ["layer"], registry=r)
        self.stall = Counter("moe_buffer_stall_seconds", "Experts waiting for their weights", ["layer"], registry=r)
        self.balancedness = Gauge(
            "moe_placement_balancedness", "Mean / max rank load over the last re-fit window", ["layer"], registry=r
        )
        self.moves = Counter("moe_placement_moves", "Experts moved by online re-balancing", ["layer"], registry=r)
        self.moved_bytes = Counter(
            "moe_placement_moved_bytes", "Expert bytes moved by online re-balancing", ["layer"], registry=r
        )
        self.refits = Gauge("moe_placement_refits_total", "Online re-balancing re-fits", registry=r)
        self.steps = Gauge("moe_engine_steps", "Serving loop steps with model calls (every rank alike)", registry=r)
        self.prefills = Gauge("moe_engine_prefill_steps", "Of them, steps with a prefill call", registry=r)

    def add_figures(self, rank: int, figures: dict[str, Any]) -> None:
        """What one rank's step hooks reported (moe_infer.runtime.steploop): {"moe": {layer: LayerFigures as a dict}}
        from runtime.metering, added up over the ranks. A new hook's figures get their metrics here, by key."""
        if rank == 0 and "loop" in figures:
            self.steps.set(figures["loop"]["steps"])
            self.prefills.set(figures["loop"]["prefills"])
        if rank == 0 and "placement" in figures:
            self.refits.set(figures["placement"]["refits"])
            for layer, f in figures["placement"]["layers"].items():
                self.balancedness.labels(layer).set(f["balancedness"])
                self.moves.labels(layer).inc(f["moves"])
                self.moved_bytes.labels(layer).inc(f["bytes_moved"])
        for layer, f in figures.get("moe", {}).items():  # (prometheus_client's metrics are thread-safe)
            for expert, pairs in enumerate(f["tokens_per_expert"]):
                if pairs:
                    self.expert_pairs.labels(layer, str(expert)).inc(pairs)
            self.routed.labels(layer).inc(f["pairs_routed"])
            self.dropped.labels(layer).inc(f["pairs_dropped"])
            self.a2a.labels(layer, "sent").inc(f["bytes_sent"])
            self.a2a.labels(layer, "received").inc(f["bytes_received"])
            if f["buffer"] is not None:
                self.hits.labels(layer).inc(f["buffer"]["hits"])
                self.misses.labels(layer).inc(f["buffer"]["misses"])
                self.copied.labels(layer).inc(f["buffer"]["bytes_copied"])
                self.stall.labels(layer).inc(f["buffer"]["stall_seconds"])

    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, float]:
        """Every sample as {name{labels}: value}, for the W&B run (histograms as their _count and _sum)."""
        flat = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                flat[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
        return flat


class MetricsLogger:
    """A thread that logs the metrics to a W&B run (pipeline.tracking) every `interval_s` seconds, and at the end.
    `metrics` is anything with ServerMetrics' `snapshot()`: on rank 0, the API process's bridge, which holds the last
    figures that process sent (moe_infer.serve.api_process)."""

    def __init__(self, metrics, tracker, interval_s: float):
        self.metrics, self.tracker, self.interval_s = metrics, tracker, interval_s
        self._stop = threading.Event()
        self._step = 0
        self._thread = threading.Thread(target=self._run, name="metrics-logger", daemon=True)
        self._thread.start()

    def _log(self) -> None:
        self._step += 1
        self.tracker.log(self.metrics.snapshot(), step=self._step)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._log()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._log()
        self.tracker.summary(**self.metrics.snapshot())
        self.tracker.finish()
