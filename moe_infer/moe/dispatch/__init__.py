"""Dispatch: how an MoE layer gets its (token, expert) pairs to the experts' ranks and their outputs back.

    routed = dispatcher.dispatch(x_TD, probs_TK, experts_TK, experts.prepare, timer)   rows to their experts' ranks
    experts(routed.rows)                                   each local expert on its rows (moe_infer.moe.experts)
    y_TD = dispatcher.combine(routed)                      outputs back to their tokens, each token's pairs summed

`routed.rows` (moe_infer.moe.experts.Rows) is what the experts read and write: the rows of every local expert grouped
by local slot, their probabilities, and the buffer the outputs go to. Before the rows arrive, the dispatcher tells
`prepare` which slots will run (so a buffered store can fetch them while the rows travel).
Under expert parallelism every rank of the group calls dispatch and combine together (with its own tokens, possibly
none), since they exchange rows by all-to-all.

    DynamicDispatch(placement, group)                       sort + count + variable all-to-all: no padding, no drops
    StaticDispatch(placement, capacity_fraction, group)     fixed capacity, padded buffers, drops past capacity
    exchange.py                                             their all-to-all (ExpertGroup) and its accounting
    shm.py                                                  its shared-memory transport (one host, CPU tensors)

Shape legend: T tokens, K experts per token, D model dim, N rows.
"""

from moe_infer.moe.dispatch.dynamic import DynamicDispatch
from moe_infer.moe.dispatch.exchange import ExpertGroup
from moe_infer.moe.dispatch.static import StaticDispatch

__all__ = ["DynamicDispatch", "ExpertGroup", "StaticDispatch"]
