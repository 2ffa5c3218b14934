"""Online expert re-balancing while serving (vLLM's and SGLang's EPLB loop, with the paper's placement algorithms): a
step hook that follows the traffic.

    engine = Engine.start(export, EngineOptions(rebalance=RebalanceOptions(interval=8, window=32)))
    rebalancer = Rebalancer(engine)
    loop.add_hook(rebalancer)        the serving loop (runtime.steploop); engine.sync.hooks for the batch loops
    rebalancer.figures()             {layer: balancedness, moves, bytes moved, re-fits}: for /metrics and W&B
    rebalancer.history               one record per layer per re-fit (step, balancedness before / fitted, moves)

What happens, on every rank at the same point after a step (the loops run hooks there):
  1. every MoE call of every layer appends its expert counts (this rank's tokens) to the layer's window of the last
     W calls. All ranks make the same calls, so the windows line up call for call;
  2. every N steps: ONE all-reduce of all layers' windows (int64 [layers, W, E]) gives every rank the group's loads,
     and each rank fits the same placement from them (moe_infer.placement.online: deterministic, no broadcast). A
     layer whose fitted placement beats the one in force goes into the queue of moves;
  3. after each later step, `layers_per_step` layers of the queue move: each expert whose rank changes is sent from
     the rank holding it to its new rank, point to point (batch_isend_irecv, no disk), as the export's four tensors in
     one flat buffer; then the layer's dispatcher and expert store are rebuilt for the new placement. With expert
     buffering the new store starts with the experts that were resident and stayed: a moved expert lands in the host
     tier, and is copied to a device slot when it is first needed. No re-fit starts while moves are queued.
A step's tokens are the same whichever rank computes an expert, so re-balancing changes no token.

A failed transfer or all-reduce (another rank died, or did not answer within the collective timeout) raises
RebalanceError naming the layer and the experts on the ranks still alive; the loops end on it, as on any failed
collective.

Shape legend: W calls in the window, E experts, D ranks.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from moe_infer.buffering.store import BufferedExperts
from moe_infer.export_format import EXPERT_TENSORS
from moe_infer.moe.dispatch import DynamicDispatch, StaticDispatch
from moe_infer.moe.experts import LocalExperts
from moe_infer.moe.layer import ServedMoELayer
from moe_infer.placement import Placement
from moe_infer.placement.online import Move, moves, refit
from moe_infer.runtime.engine import Engine, EngineError, expert_store
from pipeline.errors import PipelineError


class RebalanceError(PipelineError):
    """A re-fit or an expert move failed on this rank (usually: another rank stopped)."""


class Rebalancer:
    def __init__(self, engine: Engine):
        if engine.options.rebalance is None or engine.host_experts is None:
            raise EngineError("online re-balancing: the engine was started without EngineOptions.rebalance")
        self.engine, self.options = engine, engine.options.rebalance
        self.layers: list[ServedMoELayer] = [m for m in engine.moe_layers if isinstance(m, ServedMoELayer)]
        self.windows: dict[str, deque[torch.Tensor]] = {}
        for layer in self.layers:
            self.windows[layer.name] = deque(maxlen=self.options.window)
            layer.count_observers.append(self.windows[layer.name].append)
        self.queue: deque[tuple[ServedMoELayer, list[list[int]]]] = deque()
        self.history: list[dict[str, Any]] = []
        self.totals = {layer.name: {"balancedness": 1.0, "moves": 0, "bytes_moved": 0} for layer in self.layers}
        self.refits = 0
        self.move_seconds = 0.0
        self._reported = {name: dict(t) for name, t in self.totals.items()}

    def after_step(self, step: int, worked: bool) -> dict[str, Any] | None:
        if self.queue:
            for _ in range(min(self.options.layers_per_step, len(self.queue))):
                self._move(*self.queue.popleft(), step)
        elif worked and step % self.options.interval == 0:
            self._refit(step)
        else:
            return None
        return {"placement": self.take_figures()}

    # ---- figures ----------------------------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """Totals so far: per layer the window's balancedness under the placement in force at the last re-fit (1 is
        even), experts moved and their bytes; re-fits; seconds spent moving."""
        return {"layers": self.totals, "refits": self.refits, "move_seconds": self.move_seconds}

    def take_figures(self) -> dict[str, Any]:
        """Since the last call: moves and bytes as increments, balancedness as it stands (what /metrics adds up)."""
        layers = {}
        for name, now in self.totals.items():
            seen = self._reported[name]
            layers[name] = {
                "balancedness": now["balancedness"],
                "moves": now["moves"] - seen["moves"],
                "bytes_moved": now["bytes_moved"] - seen["bytes_moved"],
            }
            self._reported[name] = dict(now)
        return {"layers": layers, "refits": self.refits}

    def summary(self) -> dict[str, float]:
        """Flat figures for a run's summary (W&B): per layer and over all layers."""
        flat: dict[str, float] = {"placement/refits": self.refits, "placement/move_seconds": self.move_seconds}
        for name, t in self.totals.items():
            flat.update({f"placement/{name}/{k}": v for k, v in t.items()})
        flat["placement/moves"] = sum(t["moves"] for t in self.totals.values())
        flat["placement/bytes_moved"] = sum(t["bytes_moved"] for t in self.totals.values())
        return flat

    # ---- re-fit -----------------------------------------------------------------------------------------------------

    def _refit(self, step: int) -> None:
        """One all-reduce of every layer's window, then the same fit on every rank."""
        width, num_experts = self.options.window, self.layers[0].num_experts
        window_LWE = torch.zeros(len(self.layers), width, num_experts, dtype=torch.int64)
        lengths = []
        for i, layer in enumerate(self.layers):
            calls = list(self.windows[layer.name])
            lengths.append(len(calls))
            if calls:
                window_LWE[i, width - len(calls) :] = torch.stack(calls)
        if self.engine.world_size > 1:
            window_LWE = window_LWE.to(self.engine.device)
            try:
                dist.all_reduce(window_LWE)
            except RuntimeError as err:  # gloo and NCCL failures (DistBackendError is one)
                raise RebalanceError(
                    f"re-balancing at step {step}: summing the load windows over the ranks failed (another rank "
                    f"stopped or did not answer within --timeout): {err}"
                ) from err
            window_LWE = window_LWE.cpu()
        self.refits += 1
        for i, layer in enumerate(self.layers):
            current_D = self._rank_lists(layer.name)
            window_WE = window_LWE[i, width - lengths[i] :].numpy()
            new_D, before, fitted = refit(window_WE, current_D, self.options)
            self.totals[layer.name]["balancedness"] = before
            record = {"step": step, "layer": layer.name, "balancedness": before, "fitted_balancedness": fitted}
            record["moves"] = len(moves(current_D, new_D)) if new_D is not None else 0
            self.history.append(record)
            if new_D is not None:
                self.queue.append((layer, new_D))

    def _rank_lists(self, name: str) -> list[list[int]]:
        placement = self.engine.placements[name]
        return [placement.local_experts(r) for r in range(placement.ranks)]

    # ---- moves ------------------------------------------------------------------------------------------------------

    def _move(self, layer: ServedMoELayer, new_D: list[list[int]], step: int) -> None:
        """The layer's moved experts, point to point, then its dispatcher and store for the new placement."""
        engine, name = self.engine, layer.name
        started = time.perf_counter()
        moved = moves(self._rank_lists(name), new_D)
        host = engine.host_experts[name]
        received = self._exchange(name, moved, host, step)
        for move in moved:
            if move.src == engine.rank:
                del host[move.expert]
        host.update(received)
        placement = Placement.from_rank_lists(new_D, layer.num_experts)
        layer.experts = self._store(layer, new_D[engine.rank], host)
        old = layer.dispatcher
        if isinstance(old, StaticDispatch):
            layer.dispatcher = StaticDispatch(placement, old.capacity_fraction)
        else:
            layer.dispatcher = DynamicDispatch(placement)
        # The stack's one token-count agreement per forward pass (moe.layer.share_token_counts) goes on: a new leader
        # of its own would leave the stack's later layers reading the old one's stale counts (a failed pass as soon
        # as a pass's token count changes: every step of the serving loop), a new follower would agree on its own.
        layer.dispatcher.tokens = old.tokens
        engine.placements[name] = placement
        totals = self.totals[name]
        totals["moves"] += len(moved)
        totals["bytes_moved"] += len(moved) * _expert_bytes(next(iter(host.values())))
        self.move_seconds += time.perf_counter() - started

    def _exchange(
        self, name: str, moved: list[Move], host: dict[int, dict[str, torch.Tensor]], step: int
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Send this rank's leaving experts and receive its arriving ones (every rank posts its operations in expert
        order, so the pairs match); returns the arrivals as export tensors in host memory."""
        engine = self.engine
        sample = next(iter(host.values()))
        # The export's tensors of an expert (an export without biases has only the weights), in one order everywhere.
        shapes = {k: sample[k].shape for k in EXPERT_TENSORS if k in sample}
        numel, dtype = sum(s.numel() for s in shapes.values()), sample["fc1.weight"].dtype
        device = engine.device if engine.device.type == "cuda" else torch.device("cpu")  # NCCL moves device tensors
        ops, inbox = [], {}
        for move in moved:
            if move.src == engine.rank:
                flat = torch.cat([host[move.expert][k].reshape(-1) for k in shapes]).to(device)
                ops.append(dist.P2POp(dist.isend, flat, move.dst))
            elif move.dst == engine.rank:
                inbox[move.expert] = torch.empty(numel, dtype=dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, inbox[move.expert], move.src))
        if ops:
            try:
                timeout = datetime.timedelta(seconds=engine.options.timeout_s)
                for work in dist.batch_isend_irecv(ops):
                    work.wait(timeout)
            except RuntimeError as err:  # gloo and NCCL failures (DistBackendError is one)
                experts = [m.expert for m in moved if engine.rank in (m.src, m.dst)]
                raise RebalanceError(
                    f"re-balancing {name} after step {step}: moving experts {experts} between ranks failed (another "
                    f"rank stopped or did not answer within --timeout): {err}"
                ) from err
        return {expert: _unflatten(flat.cpu(), shapes) for expert, flat in inbox.items()}

    def _store(self, layer: ServedMoELayer, local: list[int], host: dict[int, dict[str, torch.Tensor]]):
        """The layer's new expert store over `local` (global ids in slot order), of the kind it had."""
        engine, old = self.engine, layer.experts
        tensors_L = [host[e] for e in local]
        if not isinstance(old, BufferedExperts):
            return LocalExperts(engine.export.model_config, tensors_L, device=engine.device)
        was_local = engine.placements[layer.name].local_experts(engine.rank)
        resident = sorted(old.cache.resident, key=old.cache.resident.get)  # local indices, by device slot
        stayed = [local.index(was_local[e]) for e in resident if was_local[e] in local]
        options = engine.options
        store = expert_store(
            engine.export.model_config, tensors_L, options.expert_slots, options.eviction, engine.device, stayed
        )
        store.totals = old.stats  # the layer's buffering figures go on across the move
        return store


def _expert_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, shape in shapes.items():
        out[key] = flat[start : start + shape.numel()].view(shape).clone()
        start += shape.numel()
    return out
