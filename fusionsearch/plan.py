"""Fusion plans as frozen values: an attention flag and the segments that tile the 15 operators."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

from .errors import PlanError
from .ops import ATTENTION_OPS, NUM_OPS, OPS

ATTN_FIRST, ATTN_LAST = ATTENTION_OPS
ATTENTION_BIT = 15  # mask bit pos0, the attention kernel over operators 2–5; bits 14 … 0 are operators 0 … 14


@dataclass(frozen=True, order=True)
class Segment:
    """Operators first…last (inclusive, 0-based) run as one kernel; `attention` = the hand-written flash kernel."""

    first: int
    last: int
    attention: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last < NUM_OPS:
            raise PlanError(f"segment {self.first}–{self.last} is outside operators 0–{NUM_OPS - 1}; "
                            f"give 0 ≤ first ≤ last ≤ {NUM_OPS - 1}")
        if self.attention and not (self.first <= ATTN_FIRST and self.last >= ATTN_LAST):
            raise PlanError(f"segment {self.first}–{self.last} cannot use the attention kernel: it must cover "
                            f"operators {ATTN_FIRST}–{ATTN_LAST}")

    @property
    def ops(self) -> tuple[int, ...]:
        return tuple(range(self.first, self.last + 1))

    @property
    def span(self) -> int:
        return self.last - self.first + 1

    @property
    def fused(self) -> bool:
        return self.span > 1

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(OPS[i].name for i in self.ops)

    @property
    def name(self) -> str:
        """Stable identifier used in kernel and file names, e.g. 'seg_07_10' or 'seg_00_06_fa'."""
        return f"seg_{self.first:02d}_{self.last:02d}" + ("_fa" if self.attention else "")

    @property
    def positions(self) -> tuple[int, int]:
        """First and last mask position (1…15)."""
        return self.first + 1, self.last + 1


@dataclass(frozen=True)
class Plan:
    """A fusion plan: `segments` tile operators 0…14 in order; with `attention` ops 2–5 share one segment."""

    attention: bool
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        expected = 0
        for seg in self.segments:
            if seg.first != expected:
                raise PlanError(f"segments must tile operators 0–{NUM_OPS - 1} in order; a segment starts at "
                                f"{seg.first} where {expected} was expected")
            if seg.attention and not self.attention:
                raise PlanError(f"segment {seg.name} uses the attention kernel but the plan's attention flag is off")
            expected = seg.last + 1
        if expected != NUM_OPS:
            raise PlanError(f"segments end at operator {expected - 1}; they must cover all {NUM_OPS} operators")
        if self.attention and not any(s.attention for s in self.segments):
            raise PlanError(f"with the attention flag, one segment must cover operators {ATTN_FIRST}–{ATTN_LAST} "
                            "and use the attention kernel")

    @classmethod
    def from_cuts(cls, cuts: "set[int] | frozenset[int] | tuple[int, ...]", attention: bool = False) -> "Plan":
        """Plan from the boundaries that are cut: cut b separates operator b−1 from operator b (1 ≤ b ≤ 14)."""
        cut_set = sorted(set(cuts))
        if any(not 1 <= b < NUM_OPS for b in cut_set):
            raise PlanError(f"cuts {cut_set} must lie in 1 … {NUM_OPS - 1}")
        if attention:
            cut_set = [b for b in cut_set if not ATTN_FIRST < b <= ATTN_LAST]
        bounds = [0, *cut_set, NUM_OPS]
        segments = []
        for first, end in itertools.pairwise(bounds):
            last = end - 1
            segments.append(Segment(first, last, attention and first <= ATTN_FIRST and last >= ATTN_LAST))
        return cls(attention, tuple(segments))

    @classmethod
    def from_segments(cls, spans: "list[tuple[int, int]]", attention: bool = False) -> "Plan":
        """Plan from (first, last) operator spans that tile 0…14."""
        segments = tuple(Segment(a, b, attention and a <= ATTN_FIRST and b >= ATTN_LAST) for a, b in spans)
        return cls(attention, segments)

    @cached_property
    def cuts(self) -> frozenset[int]:
        return frozenset(seg.first for seg in self.segments[1:])

    @property
    def kernel_count(self) -> int:
        return len(self.segments)

    @property
    def fused_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.fused)

    @cached_property
    def mask(self) -> int:
        """Canonical 16-bit mask: pos0 = attention, operator 0's bit is 0, bits flip exactly at cuts."""
        value = 1 << ATTENTION_BIT if self.attention else 0
        bit = 0
        for op in range(NUM_OPS):
            if op in self.cuts:
                bit ^= 1
            value |= bit << (14 - op)
        return value

    @property
    def canonical_id(self) -> int:
        """Canonical plan id: the canonical mask, equal for every mask that denotes this plan."""
        return self.mask

    @property
    def bits(self) -> str:
        return format(self.mask, "016b")

    def describe(self) -> str:
        parts = []
        for seg in self.segments:
            label = "+".join(seg.op_names)
            parts.append(f"[{seg.first}–{seg.last}{' attn' if seg.attention else ''}: {label}]"
                         if seg.fused else f"[{seg.first}: {label}]")
        return " ".join(parts)


# Boundaries the attention flag fixes (inside ops 2–5) cannot be cut.
_FREE_BOUNDARIES = tuple(range(1, NUM_OPS))
_FREE_BOUNDARIES_ATTN = tuple(b for b in _FREE_BOUNDARIES if not ATTN_FIRST < b <= ATTN_LAST)


def enumerate_plans(attention: bool | None = None):
    """Yield every canonical plan once: 2^14 without the attention kernel, 2^11 with it (18,432 in all)."""
    flags = (False, True) if attention is None else (attention,)
    for flag in flags:
        free = _FREE_BOUNDARIES_ATTN if flag else _FREE_BOUNDARIES
        for choice in range(1 << len(free)):
            yield Plan.from_cuts({b for i, b in enumerate(free) if choice >> i & 1}, attention=flag)


def plan_count(attention: bool | None = None) -> int:
    flags = (False, True) if attention is None else (attention,)
    return sum(1 << len(_FREE_BOUNDARIES_ATTN if f else _FREE_BOUNDARIES) for f in flags)


def all_segments() -> tuple[Segment, ...]:
    """Every distinct segment kernel any plan uses: 120 contiguous spans plus 30 attention variants."""
    plain = [Segment(a, b) for a in range(NUM_OPS) for b in range(a, NUM_OPS)]
    attn = [Segment(a, b, True) for a in range(ATTN_FIRST + 1) for b in range(ATTN_LAST, NUM_OPS)]
    return tuple(plain + attn)


# Plans that other systems fuse by hand, as (boundaries cut, attention flag): reports and sweeps time them beside
# the searched best, and `search --hand-fused-start` measures them first.
HAND_FUSED: dict[str, tuple[frozenset[int], bool]] = {
    "ByteTransformer [0][1–6][7][8–9][10–11][12][13–14] + attention kernel":
        (frozenset({1, 7, 8, 10, 12, 13}), True),
    "FasterTransformer [0][1][2][3–4][5][6][7][8–9][10][11][12][13–14]":
        (frozenset({1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13}), False),
    "fully unfused": (frozenset(range(1, NUM_OPS)), False),
}


def hand_fused_plans() -> dict[str, Plan]:
    """The hand-fused plans of other systems, by name."""
    return {name: Plan.from_cuts(cuts, attention=attention) for name, (cuts, attention) in HAND_FUSED.items()}
