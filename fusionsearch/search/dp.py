"""The segment dynamic program: the k cheapest plans when a plan costs the sum of its segment kernels' latencies."""
from __future__ import annotations

import heapq
import math
from typing import Mapping

from ..ops import NUM_OPS
from ..plan import ATTN_FIRST, ATTN_LAST, Plan, Segment


def _segment(first: int, last: int, attention: bool) -> Segment | None:
    """The kernel that runs ops first…last under the attention flag, or None where the flag forbids the span."""
    touches = first <= ATTN_LAST and last >= ATTN_FIRST
    if not attention or not touches:
        return Segment(first, last)
    if first <= ATTN_FIRST and last >= ATTN_LAST:
        return Segment(first, last, True)
    return None  # with the flash kernel, ops 2–5 cannot be split


def k_best_plans(latency_us: Mapping[Segment, float], k: int,
                 attention: "bool | None" = None) -> list[tuple[float, Plan]]:
    """The k plans of least summed segment latency, cheapest first (ties by canonical id); both flags by default.

    Segments missing from latency_us or with a non-finite latency (failed kernels) are never used. best[j] holds
    the k cheapest ways to run ops 0…j−1 as whole segments, each a (cost, cuts) pair; best[15] answers.
    """
    if k < 1:
        return []
    flags = (False, True) if attention is None else (attention,)
    found: list[tuple[float, int, Plan]] = []
    for flag in flags:
        best: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(NUM_OPS + 1)]
        best[0] = [(0.0, ())]
        for end in range(1, NUM_OPS + 1):
            options = []
            for start in range(end):
                seg = _segment(start, end - 1, flag)
                cost = latency_us.get(seg, math.inf) if seg is not None else math.inf
                if not math.isfinite(cost):
                    continue
                options.extend((prefix + cost, cuts + ((start,) if start else ())) for prefix, cuts in best[start])
            best[end] = heapq.nsmallest(k, options)
        for cost, cuts in best[NUM_OPS]:
            plan = Plan.from_cuts(cuts, attention=flag)
            found.append((cost, plan.canonical_id, plan))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(cost, plan) for cost, _, plan in found[:k]]
