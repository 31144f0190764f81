"""Runs of pure decode steps in closed form, for sim/engine_core.py.

Between events (finish, KV growth that needs a preemption, an admissible arrival) the
batch does not change, so runs of pure decode steps are advanced in one go. Step k of such a
run lasts A + k*delta (the context grows by one token per sequence per step), so the time of k
steps is a closed-form sum; block growth is periodic in block_size steps, so the step at which
the KV cache runs out is found from the count of sequences per position in their last block.
Per-sequence state is kept relative to a global step counter, so a run costs O(block_size), not
O(batch). These functions are that arithmetic."""

from __future__ import annotations

import math

from ebbtide.sim.capacity import CapacityModel

UNBOUNDED = 2**62


def run_time(a: float, delta: float, k: int) -> float:
    """Duration of k decode steps lasting a, a + delta, a + 2 delta, ..."""
    return k * a + delta * (k * (k - 1) / 2)


def steps_within(a: float, delta: float, budget: float) -> int:
    """Largest k with run_time(a, delta, k) <= budget."""
    if budget < a:
        return 0
    if budget == math.inf:
        return UNBOUNDED
    b = a - delta / 2
    # Root of delta/2 k^2 + b k - budget = 0, in the form without cancellation for small delta.
    k = int(2 * budget / (b + math.sqrt(b * b + 2 * delta * budget)))
    while run_time(a, delta, k + 1) <= budget:
        k += 1
    while k and run_time(a, delta, k) > budget:
        k -= 1
    return k


def steps_before_full(free: int, n: int, bs: int, g: int, residues: list[int]) -> int:
    """Decode steps whose block growth fits in `free` blocks: `n` sequences, `residues[r]` of
    them with (base % bs) == r, at global step `g`."""
    cycles = free // n  # every block_size steps each sequence takes exactly one block
    i, cum = cycles * bs, cycles * n
    while True:
        cum += residues[(1 - g - i) % bs]
        if cum > free:
            return i
        i += 1


def blocks_for_steps(k: int, n: int, bs: int, g: int, residues: list[int]) -> int:
    """Blocks the `n` decoding sequences take over the next `k` steps (see steps_before_full)."""
    cycles = k // bs
    return cycles * n + sum(residues[(1 - g - j) % bs] for j in range(cycles * bs, k))


def coefficients(model: CapacityModel, n: int, sum_base: int, g: int) -> tuple[float, float]:
    """(a, delta) of a run of `n` decoding sequences whose bases sum to `sum_base`, from step `g`."""
    return model.step_seconds(n, sum_base + n * g), model.step_per_context_token_s * n
