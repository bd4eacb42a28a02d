"""Which rank computes which group (or which block of a group's queries): a pure function of the
token counts every rank holds after one all_gather, so every rank computes the same plan without
further communication.

Cost of a group of n tokens: n^2 (Hista's GEMM, 2 n^2 D flops). A group whose cost exceeds a fair
share of the total (total / W) is cut into k = ceil(cost * W / total) blocks of queries (k <= W, k <= n);
each block's owner receives the whole group as keys. Items (whole groups and blocks) are placed
longest first; each goes to the rank that already holds most of the group's tokens among those that
stay within 5% above the fair share (fewer bytes to move), else to the least loaded rank, and two blocks
of one group never share a rank. See docs/DESIGN.md, "Distributed groups".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BALANCE_SLACK = (21, 20)   # a rank may take an item while its load stays within 21/20 of the fair share


class Plan(NamedTuple):
    """Items in canonical order (group, block): group index, query range [lo, hi) in the group's global
    token order (rank by rank, local order within a rank), the owner rank, and whether it is the whole
    group."""

    group: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    owner: np.ndarray
    whole: np.ndarray

    def loads(self, sizes: np.ndarray, world: int) -> np.ndarray:
        """Cost (query tokens x key tokens) each rank computes."""
        out = np.zeros(world, dtype=np.float64)
        np.add.at(out, self.owner, (self.hi - self.lo).astype(np.float64) * sizes[self.group])
        return out


def plan(counts: np.ndarray) -> Plan:
    """counts[g, r]: tokens of group g on rank r (every group has at least one token)."""
    num_groups, world = counts.shape
    sizes = [int(s) for s in counts.sum(axis=1)]
    total = sum(s * s for s in sizes)
    items = []   # (cost, g, p, lo, hi)
    for g, n in enumerate(sizes):
        k = 1 if total == 0 or n * n * world <= total else min(world, n, -(-n * n * world // total))
        for p in range(k):
            lo, hi = p * n // k, (p + 1) * n // k
            items.append(((hi - lo) * n, g, p, lo, hi, k == 1))
    limit = total * BALANCE_SLACK[0] // (BALANCE_SLACK[1] * max(world, 1))
    loads = np.zeros(world, dtype=np.int64)   # integers: exact, so every rank computes the same plan
    taken = np.zeros((num_groups, world), dtype=bool)
    ranks = np.arange(world)
    owner_of = {}
    for cost, g, p, lo, hi, whole in sorted(items, key=lambda it: (-it[0], it[1], it[2])):
        local = counts[g].astype(np.int64)
        free = ~taken[g]
        fits = free & (loads + cost <= max(limit, cost))
        if fits.any():   # most of the group already here, then least loaded, then lowest rank
            order = np.lexsort((ranks, loads, -local))
            best = int(order[np.argmax(fits[order])])
        else:
            order = np.lexsort((ranks, -local, loads))
            best = int(order[np.argmax(free[order])])
        loads[best] += cost
        taken[g, best] = True
        owner_of[(g, p)] = best
    items.sort(key=lambda it: (it[1], it[2]))
    return Plan(
        group=np.array([it[1] for it in items], dtype=np.int64),
        lo=np.array([it[3] for it in items], dtype=np.int64),
        hi=np.array([it[4] for it in items], dtype=np.int64),
        owner=np.array([owner_of[(it[1], it[2])] for it in items], dtype=np.int64),
        whole=np.array([it[5] for it in items], dtype=bool),
    )
