"""The shifting-workload bench's balancedness over time (moe_infer.bench.shift): each call's loads count under the
placement in force at that call, summed per window."""

import numpy as np
import pytest

from moe_infer.bench.shift import balancedness_over_time


def test_each_call_counts_under_the_placement_in_force_then():
    counts_CE = np.array([[4, 0, 0, 0], [4, 0, 0, 0], [0, 0, 4, 0], [0, 0, 4, 0]])  # expert 0 hot, then expert 2
    contiguous = [(0, [[0, 1], [2, 3]])]
    assert balancedness_over_time(counts_CE, contiguous, window=2) == [0.5, 0.5]  # one rank does everything
    # Experts 0 and 2 on different ranks from call 1 on: windows [0, 1] and [2, 3] each mix the two placements.
    spread = [(0, [[0, 1], [2, 3]]), (1, [[0, 3], [1, 2]])]
    assert balancedness_over_time(counts_CE, spread, window=2) == [0.5, 0.5]
    moved = [(0, [[0, 1], [2, 3]]), (3, [[2, 1], [0, 3]])]  # expert 2 comes to rank 0 for the last call
    assert balancedness_over_time(counts_CE, moved, window=2) == [0.5, pytest.approx(1.0)]
    assert balancedness_over_time(counts_CE, contiguous, window=3) == [
        0.75
    ]  # loads (8, 4); the partial last window: left out
