"""The expert FFN kernel: a layer's local experts, each on its own rows, with the rows grouped by expert.

    weights = ExpertWeights.stack([tensors of expert 0, of expert 1, ...])     stacked over G experts
    kernel = ExpertKernel("gelu", ffn=256, grouped_max_rows=32)              (crossover.py measures that figure)
    kernel(weights, x_MD, probs_M, rows_G, out_MD)     out_MD rows of expert g = (W2 act(W1 x + b1) + b2) * p

Two ways to run the experts, one of them for the whole call, chosen by its rows per active expert against the
measured crossover:
    grouped     torch.nn.functional.grouped_mm: one fc1 and one fc2 call over a run of experts (a C++ loop of matrix
                products on CPU and for fp32 on CUDA; CUTLASS grouped GEMM for bf16 on sm90+). The biases are
                gathered per row. Below the crossover it wins: a per-expert loop pays a handful of Python-level op
                calls per expert, which at a few rows per expert cost more than the products.
    per-expert  per expert: fc1 + bias, activation, fc2 + bias into its rows of out, scale. Above the
                crossover it wins: each expert's [N, F] activation stays in cache between its two products, where
                the grouped call writes all of them before reading them back.
The grouped call runs over runs of active experts (an empty expert costs grouped_mm ~4 us on CPU, so a gap of
GAP_SPLIT or more empty experts starts a new call: only active experts cost anything), and on CPU over at most
CPU_ROWS_BUDGET_BYTES of activation per call, so a run's [N, F] activation stays in cache too.
Why one kernel per call and not per expert (a trained router's loads are uneven): running the big experts alone cuts
the grouped runs into short pieces, and the pieces' fixed costs ate more than the big experts gained. Measured on the
layer bench's 1024 tokens (E=64, D=128, F=256, top-2, 12-56 rows per expert, crossover 32, 1 thread, before the CPU
layout below): grouped 17.9 ms, per-expert 20.5, split at 32 rows 23.0. A very big expert is a grouped call of its
own anyway (the row budget).

The weight layout, measured per shape with the crossover (crossover.py), on CPU only:
    exported    each expert's [out, in] row-major, as exported: x @ W^T reads W column by column (oneDNN's
                transposed-B GEMM). Faster at D=256, F=1024: the per-expert FFN 6-12% at 32-128 rows per expert
                (with fused biases, 128 rows: 199.0 and 193.7 ms against 205.0 and 205.6 transposed).
    transposed  each expert's W^T [in, out] contiguous, still seen as [out, in]: x @ W^T reads W^T row by row.
                Faster at D=128, F=256: fc1 + GELU + fc2 10-25% at a few to a few dozen rows per expert (grouped
                15.3 -> 13.2 ms at 1024 tokens).
On CUDA the exported layout (not measured: no GPU here when this was written).

The probability is applied to the output: p * (W2 h + b2) = W2 (h p) + b2 p, the reference's form (moe_infer.model.moe,
megatron's per-token scale) up to fp32 rounding, at D columns per row instead of F. Experts may come without biases
(exports with `model.bias: false`): both b1 and b2 are then None. The per-expert kernel fuses the biases into the
products (addmm, as F.linear does); the grouped one adds them after (grouped_mm has no bias), and so does `one` when
it stands in for a grouped call, so the two never mix within a call's arithmetic.

Shape legend: G experts in the stack (local experts, or device slots), M rows (grouped by expert), N one expert's
rows, D model dim, F ffn dim, F1 fc1 rows (F, or 2F for swiglu).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_infer.model.layers import activation as apply_activation
from pipeline.errors import PipelineError

EXPORTED, TRANSPOSED = "exported", "transposed"  # the weight layouts (above)
LAYOUTS = (EXPORTED, TRANSPOSED)
GAP_SPLIT = 8  # this many empty experts in a row cost more than one more grouped call: split there
CPU_ROWS_BUDGET_BYTES = 512 * 1024  # fc1 activation per grouped call on CPU: half of a 1 MiB L2


@dataclass
class ExpertWeights:
    """G experts' weights stacked: w1 [G, F1, D], b1 [G, F1], w2 [G, D, F], b2 [G, D] (biases None when absent), the
    matrices stored in `layout` (EXPORTED or TRANSPOSED, above) and always seen as [G, out, in]."""

    w1_GFD: torch.Tensor
    b1_GF: torch.Tensor | None
    w2_GDF: torch.Tensor
    b2_GD: torch.Tensor | None
    layout: str = EXPORTED

    @classmethod
    def stack(
        cls,
        experts: list[dict[str, torch.Tensor]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
    ) -> ExpertWeights:
        """Each expert's {"fc1.weight", "fc2.weight"} and, for all of them or for none, {"fc1.bias", "fc2.bias"}.
        The matrices are stored in `layout` (default: default_layout(device); the kernel's measured one is
        ExpertKernel.layout)."""
        if not experts:
            raise PipelineError("expert weights: nothing to stack (no experts)")
        first = experts[0]["fc1.weight"]
        device, dtype = device or first.device, dtype or first.dtype
        layout = layout or default_layout(device)
        if layout not in LAYOUTS:
            raise PipelineError(f"expert weights: layout {layout!r}, expected one of {', '.join(LAYOUTS)}")
        with_bias = ["fc1.bias" in e and "fc2.bias" in e for e in experts]
        if any(with_bias) and not all(with_bias):
            raise PipelineError(
                "local experts: some experts of a layer have biases (fc1.bias, fc2.bias) and some do not; expected "
                "all or none (the export's model.bias setting)"
            )

        def stacked(name: str) -> torch.Tensor | None:
            if name.endswith("bias") and not with_bias[0]:
                return None
            stacked = torch.stack([e[name] for e in experts]).to(device=device, dtype=dtype)
            return _in_layout(stacked, layout) if stacked.dim() == 3 else stacked.contiguous()

        return cls(stacked("fc1.weight"), stacked("fc1.bias"), stacked("fc2.weight"), stacked("fc2.bias"), layout)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w1_GFD, self.b1_GF, self.w2_GDF, self.b2_GD) if t is not None)

    @property
    def num_experts(self) -> int:
        return self.w1_GFD.shape[0]

    def expert_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors)

    def map(self, fn) -> ExpertWeights:
        """fn applied to each tensor (the absent biases stay None); fn must keep each tensor's strides."""
        tensors = (self.w1_GFD, self.b1_GF, self.w2_GDF, self.b2_GD)
        return ExpertWeights(*(None if t is None else fn(t) for t in tensors), self.layout)

    def empty_like(self, num_experts: int, device: torch.device | str) -> ExpertWeights:
        """Room for `num_experts` experts of this shape and layout on `device` (the buffered store's device slots)."""

        def empty(t: torch.Tensor) -> torch.Tensor:
            shape = (num_experts, *t.shape[1:])
            if t.dim() == 3:
                return _empty_in_layout(shape, t.dtype, device, self.layout)
            return torch.empty(shape, dtype=t.dtype, device=device)

        return self.map(empty)

    def copy_expert_(self, g: int, src: ExpertWeights, e: int, non_blocking: bool = False) -> None:
        """Expert `e` of `src` into place `g` of these weights."""
        for dst, source in zip(self.tensors, src.tensors, strict=True):
            dst[g].copy_(source[e], non_blocking=non_blocking)


def default_layout(device: torch.device | str) -> str:
    """The layout used where none was measured (a forced kernel, a stack without a kernel): TRANSPOSED on CPU (the
    faster one at the trained models' D=128), EXPORTED elsewhere."""
    return TRANSPOSED if torch.device(device).type == "cpu" else EXPORTED


def _in_layout(w_GOI: torch.Tensor, layout: str) -> torch.Tensor:
    """Stacked [G, out, in] matrices stored in `layout`, still seen as [G, out, in]."""
    if layout == EXPORTED:
        return w_GOI.contiguous()
    return _empty_in_layout(w_GOI.shape, w_GOI.dtype, w_GOI.device, layout).copy_(w_GOI)


def _empty_in_layout(shape_GOI, dtype: torch.dtype, device: torch.device | str, layout: str) -> torch.Tensor:
    """Room for stacked [G, out, in] matrices stored in `layout`."""
    if layout == EXPORTED:
        return torch.empty(shape_GOI, dtype=dtype, device=device)
    groups, rows, cols = shape_GOI
    return torch.empty((groups, cols, rows), dtype=dtype, device=device).transpose(1, 2)


@dataclass(frozen=True)
class ExpertKernel:
    activation: str
    ffn: int  # F
    grouped_max_rows: int  # grouped when the rows per active expert are at most this (0: never)
    layout: str = EXPORTED  # the weight layout the products were measured fastest with: stack the weights in it
    note: str = ""  # how grouped_max_rows and the layout were chosen (crossover.py)

    def __call__(
        self,
        weights: ExpertWeights,
        x_MD: torch.Tensor,
        probs_M: torch.Tensor,
        rows_G: list[int],
        out_MD: torch.Tensor,
    ) -> torch.Tensor:
        """Expert g on its rows_G[g] rows (in order), into out_MD; returns out_MD. One kernel for the whole call,
        chosen by its rows per active expert (uses_grouped)."""
        if self.uses_grouped(rows_G):
            return self.grouped(weights, x_MD, probs_M, rows_G, out_MD)
        return self.per_expert(weights, x_MD, probs_M, rows_G, out_MD)

    def per_expert(self, weights, x_MD, probs_M, rows_G, out_MD) -> torch.Tensor:
        """Each expert alone, the biases fused into the products."""
        start = 0
        for g, n in enumerate(rows_G):
            end = start + n
            if n:
                self.one(weights, g, x_MD[start:end], probs_M[start:end], out_MD[start:end])
            start = end
        return out_MD

    def one(self, weights: ExpertWeights, g: int, x_ND, probs_N, out_ND, fused_bias: bool = True) -> torch.Tensor:
        """Expert g alone on x_ND, into out_ND. fused_bias: the biases go into the products (addmm, as F.linear: one
        pass less over the [N, F] activation; 64 experts' FFNs, one core, 21-41 interleaved rounds, two runs each:
        205.0 and 205.6 ms against 216.4 and 203.7 in the transposed layout at D=256, F=1024, 128 rows per expert,
        17.6 and 17.9 against 18.0 and 18.4 at D=128, F=256, 32 rows; in the exported layout at D=256 199.0 and
        193.7 against 197.0 and 198.0: within noise to 5% faster). Without,
        they are added after each product as the grouped call adds them (addmm rounds differently at some shapes),
        so the output equals the grouped call's bit for bit: a buffered store's one-at-a-time rounds standing in
        for a grouped call use that."""
        w = weights
        fused = fused_bias and w.b1_GF is not None
        if fused:
            h_NF = torch.addmm(w.b1_GF[g], x_ND, w.w1_GFD[g].t())
        else:
            h_NF = torch.mm(x_ND, w.w1_GFD[g].t())
            if w.b1_GF is not None:
                h_NF.add_(w.b1_GF[g])
        h_NF = apply_activation(self.activation, h_NF)
        if fused:
            torch.addmm(w.b2_GD[g], h_NF, w.w2_GDF[g].t(), out=out_ND)
        else:
            torch.mm(h_NF, w.w2_GDF[g].t(), out=out_ND)
            if w.b2_GD is not None:
                out_ND.add_(w.b2_GD[g])
        return out_ND.mul_(probs_N.unsqueeze(-1).to(out_ND.dtype))

    def uses_grouped(self, rows_G: list[int]) -> bool:
        """Whether a call with these rows per expert runs grouped: at least two active experts, with at most
        grouped_max_rows rows each on average (the crossover is measured at equal rows per expert)."""
        active = sum(1 for n in rows_G if n)
        return active > 1 and sum(rows_G) <= self.grouped_max_rows * active

    def grouped(self, weights, x_MD, probs_M, rows_G, out_MD) -> torch.Tensor:
        """The experts in grouped GEMM calls."""
        w = weights
        p_M1 = probs_M.unsqueeze(-1).to(x_MD.dtype)
        budget = _rows_budget(x_MD, w.w1_GFD.shape[1])
        for first, last, start, end in _runs(rows_G, budget):
            x_ND = x_MD[start:end]
            offs = torch.tensor(_offsets(rows_G[first:last]), dtype=torch.int32, device=x_MD.device)
            h_NF = F.grouped_mm(x_ND, w.w1_GFD[first:last].transpose(1, 2), offs=offs)
            expert_N = None
            if w.b1_GF is not None:
                counts = torch.tensor(rows_G[first:last], device=x_MD.device)
                expert_N = torch.arange(first, last, device=x_MD.device)
                expert_N = expert_N.repeat_interleave(counts, output_size=end - start)
                h_NF.add_(w.b1_GF.index_select(0, expert_N))
            h_NF = apply_activation(self.activation, h_NF)
            y_ND = F.grouped_mm(h_NF, w.w2_GDF[first:last].transpose(1, 2), offs=offs)
            if expert_N is not None:
                y_ND.add_(w.b2_GD.index_select(0, expert_N))
            torch.mul(y_ND, p_M1[start:end], out=out_MD[start:end])
        return out_MD

    def products(self, weights: ExpertWeights, x_MD: torch.Tensor, rows_G: list[int]) -> None:
        """The experts' two matrix products and nothing else (no bias, activation or probability), one expert at a
        time: the floor an MoE layer's expert phase is measured against."""
        start = 0
        for g, n in enumerate(rows_G):
            if n:
                h_NF = torch.mm(x_MD[start : start + n], weights.w1_GFD[g].t())
                torch.mm(h_NF[:, : self.ffn], weights.w2_GDF[g].t())
                start += n


def _offsets(rows: list[int]) -> list[int]:
    """grouped_mm's offs: the end row of each group."""
    ends, total = [], 0
    for n in rows:
        total += n
        ends.append(total)
    return ends


def _rows_budget(x_MD: torch.Tensor, f1: int) -> int:
    """The most rows one grouped call takes: all of them on CUDA, a cache's worth of activation on CPU."""
    if x_MD.device.type != "cpu":
        return x_MD.shape[0]
    return max(1, CPU_ROWS_BUDGET_BYTES // (f1 * x_MD.element_size()))


def _runs(rows_G: list[int], budget: int) -> list[tuple[int, int, int, int]]:
    """(first expert, last expert + 1, first row, end row) of each grouped call: consecutive experts, split at a gap of
    GAP_SPLIT empty experts or where the rows would pass `budget` (an expert is never split); empty experts at either
    end left out."""
    runs, first, start, row, gap = [], None, 0, 0, 0
    for g, n in enumerate(rows_G):
        if n and first is not None and (gap >= GAP_SPLIT or row + n - start > budget):
            runs.append((first, g - gap, start, row))
            first = None
        if n:
            if first is None:
                first, start = g, row
            gap = 0
        else:
            gap += 1
        row += n
    if first is not None:  # after it only empty experts (one run apart would have closed it)
        runs.append((first, len(rows_G) - gap, start, row))
    return runs
