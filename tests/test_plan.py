"""Plans and segments: frozen values that tile the 15 operators; the enumeration of every plan."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusionsearch.errors import PlanError
from fusionsearch.ops import ATTENTION_OPS, NUM_OPS, OPS
from fusionsearch.plan import Plan, Segment, all_segments, enumerate_plans, plan_count

cut_sets = st.sets(st.integers(min_value=1, max_value=NUM_OPS - 1))


@pytest.fixture(scope="module")
def every_plan():
    return list(enumerate_plans())


def test_enumeration_yields_18432_distinct_plans(every_plan):
    assert len(every_plan) == plan_count() == 18432
    assert len({p.mask for p in every_plan}) == 18432
    assert plan_count(attention=False) == 2 ** 14 and plan_count(attention=True) == 2 ** 11


def test_150_segment_kernels_cover_every_plan(every_plan):
    segments = all_segments()
    assert len(segments) == len(set(segments)) == 150
    assert sum(1 for s in segments if s.attention) == 30
    assert {s for p in every_plan for s in p.segments} == set(segments)


@given(cut_sets, st.booleans())
def test_segments_tile_all_operators_in_order(cuts, attention):
    plan = Plan.from_cuts(cuts, attention=attention)
    ops = [op for seg in plan.segments for op in seg.ops]
    assert ops == list(range(NUM_OPS))
    assert plan.kernel_count == len(plan.segments)


@given(cut_sets, st.booleans())
def test_plan_rebuilt_from_its_cuts_or_segments_is_equal(cuts, attention):
    plan = Plan.from_cuts(cuts, attention=attention)
    assert Plan.from_cuts(plan.cuts, attention=attention) == plan
    assert Plan.from_segments([(s.first, s.last) for s in plan.segments], attention=attention) == plan


@given(cut_sets)
def test_attention_plan_drops_cuts_inside_the_attention_block(cuts):
    first, last = ATTENTION_OPS
    plan = Plan.from_cuts(cuts, attention=True)
    assert not {b for b in plan.cuts if first < b <= last}
    assert sum(1 for s in plan.segments if s.attention) == 1


def test_plans_are_hashable_frozen_values():
    plan = Plan.from_cuts({3, 7})
    assert {plan: 1}[Plan.from_cuts({7, 3})] == 1
    with pytest.raises(AttributeError):
        plan.attention = True  # type: ignore[misc]


def test_segment_names_encode_span_and_attention_kernel():
    assert Segment(7, 10).name == "seg_07_10"
    assert Segment(0, 6, attention=True).name == "seg_00_06_fa"
    assert Segment(7, 10).op_names == tuple(op.name for op in OPS[7:11])
    assert Segment(2, 2).positions == (3, 3) and not Segment(2, 2).fused


@pytest.mark.parametrize("first, last", [(-1, 3), (4, 3), (0, NUM_OPS)])
def test_segment_outside_the_operators_raises_plan_error(first, last):
    with pytest.raises(PlanError, match=f"{first}"):
        Segment(first, last)


def test_attention_segment_must_cover_ops_2_to_5():
    with pytest.raises(PlanError, match="2–5"):
        Segment(3, 9, attention=True)


@pytest.mark.parametrize("spans", [
    [(0, 3), (5, 14)],          # gap
    [(0, 5), (5, 14)],          # overlap
    [(0, 13)],                  # short
])
def test_segments_that_do_not_tile_raise_plan_error(spans):
    with pytest.raises(PlanError):
        Plan.from_segments(spans)


def test_attention_flag_without_attention_segment_raises_plan_error():
    with pytest.raises(PlanError, match="attention"):
        Plan(True, (Segment(0, 14),))
    with pytest.raises(PlanError, match="attention flag is off"):
        Plan(False, (Segment(0, 14, attention=True),))


@pytest.mark.parametrize("cut", [0, NUM_OPS])
def test_cut_outside_the_inner_boundaries_raises_plan_error(cut):
    with pytest.raises(PlanError, match=str(cut)):
        Plan.from_cuts({cut})
