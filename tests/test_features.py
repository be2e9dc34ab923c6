"""Plan features: one fixed-length row per canonical plan, structure-respecting, fast for all 18,432 plans."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusionsearch.config import LayerConfig
from fusionsearch.errors import MaskError
from fusionsearch.features import (all_canonical_masks, canonical_masks, estimate_us, feature_names, plan_features,
                                   segment_incidence, segment_table)
from fusionsearch.mask import decode
from fusionsearch.ops import NUM_OPS, OPS, layer_flops, layer_min_bytes
from fusionsearch.plan import Plan, Segment, all_segments, enumerate_plans

CFG = LayerConfig(16, 128)
OP_BITS = (1 << 15) - 1
masks = st.integers(min_value=0, max_value=0xFFFF)


def column(matrix: np.ndarray, name: str) -> np.ndarray:
    return matrix[:, feature_names().index(name)]


def test_all_18432_plans_featurise_in_seconds_into_one_finite_row_each():
    started = time.perf_counter()
    matrix = plan_features(all_canonical_masks(), CFG)
    elapsed = time.perf_counter() - started
    assert matrix.shape == (18_432, len(feature_names()))
    assert np.isfinite(matrix).all()
    assert elapsed < 5.0, f"featurising 18,432 plans took {elapsed:.1f} s"


def test_feature_names_are_unique_and_fixed_length():
    names = feature_names()
    assert len(names) == len(set(names))
    assert [n for n in names if n.startswith("cut_")] == [f"cut_{b:02d}" for b in range(1, NUM_OPS)]
    assert [n for n in names if n.startswith("span_op")] == [f"span_op{k:02d}" for k in range(NUM_OPS)]


def test_features_are_deterministic():
    first = plan_features(all_canonical_masks()[::7], CFG)
    second = plan_features(all_canonical_masks()[::7], CFG)
    assert np.array_equal(first, second)


def test_canonical_ids_are_exactly_the_enumerated_plans():
    assert np.array_equal(all_canonical_masks(), np.array(sorted(p.mask for p in enumerate_plans())))


@given(masks)
@settings(max_examples=300, deadline=None)
def test_every_spelling_of_a_plan_gives_identical_features(value):
    plan = decode(value)
    complement = value ^ OP_BITS
    rows = plan_features([value, complement, plan.mask, plan], CFG)
    assert (rows == rows[0]).all()
    assert canonical_masks([value, complement]).tolist() == [plan.mask, plan.mask]


@given(masks)
@settings(max_examples=200, deadline=None)
def test_structure_columns_agree_with_the_plan(value):
    plan = decode(value)
    row = plan_features([value], CFG)
    assert column(row, "attention")[0] == plan.attention
    assert column(row, "kernel_count")[0] == plan.kernel_count
    assert column(row, "fused_kernel_count")[0] == len(plan.fused_segments)
    for b in range(1, NUM_OPS):
        assert column(row, f"cut_{b:02d}")[0] == (b in plan.cuts)
    for seg in plan.segments:
        for k in seg.ops:
            assert column(row, f"span_op{k:02d}")[0] == seg.span
    incidence = segment_incidence([value])[0]
    assert [s for s, used in zip(all_segments(), incidence, strict=True) if used] == sorted(plan.segments,
                                                                                              key=all_segments().index)


def test_every_plan_does_the_layers_flops():
    matrix = plan_features(all_canonical_masks(), CFG)
    assert np.allclose(np.exp(column(matrix, "log_flops")), layer_flops(CFG), rtol=1e-12)


def test_unfused_plan_moves_every_operators_inputs_and_output():
    unfused = Plan.from_cuts(set(range(1, NUM_OPS)))
    row = plan_features([unfused], CFG)
    assert np.exp(column(row, "log_boundary_bytes"))[0] == pytest.approx(sum(op.min_bytes(CFG) for op in OPS))
    assert column(row, "barriers")[0] == 0


def test_one_kernel_plan_moves_only_the_layers_minimum_bytes():
    fused = Plan.from_cuts(set(), attention=True)
    row = plan_features([fused], CFG)
    assert np.exp(column(row, "log_boundary_bytes"))[0] == pytest.approx(layer_min_bytes(CFG, fused_attention=True))


def test_fusing_fewer_kernels_never_moves_more_boundary_bytes():
    # Removing one cut merges two kernels: the tensor between them stops crossing a boundary.
    many = Plan.from_cuts({3, 7, 10, 12})
    fewer = Plan.from_cuts({3, 7, 10})
    rows = plan_features([many, fewer], CFG)
    assert column(rows, "log_boundary_bytes")[1] < column(rows, "log_boundary_bytes")[0]


@pytest.mark.parametrize("segment, barriers, gemm_then_red, red_then_gemm, two_gemms", [
    (Segment(2, 5, attention=True), 0, 0, 0, 0),   # flash attention: scores never leave the block
    (Segment(2, 5), 2, 1, 1, 1),                   # qk → softmax → pv as a persistent kernel
    (Segment(7, 9), 1, 1, 0, 0),                   # out GEMM + bias/residual + LayerNorm over H
    (Segment(9, 10), 1, 0, 1, 0),                  # LayerNorm then a GEMM over the normalised rows
    (Segment(10, 12), 1, 0, 0, 1),                 # FFN1 + GELU + FFN2
    (Segment(11, 13), 0, 0, 0, 0),                 # GELU prologue, residual epilogue around one GEMM
    (Segment(0, 0), 0, 0, 0, 0),
])
def test_grid_barriers_fall_where_dependencies_cross_thread_blocks(segment, barriers, gemm_then_red,
                                                                   red_then_gemm, two_gemms):
    facts = segment_table(CFG)[segment]
    assert (facts["barriers"], facts["gemm_then_reduction"], facts["reduction_then_gemm"], facts["two_gemms"]) == (
        barriers, gemm_then_red, red_then_gemm, two_gemms)


def test_flash_attention_keeps_the_score_matrix_out_of_memory():
    table = segment_table(LayerConfig(8, 512))
    assert table[Segment(2, 5, attention=True)]["barrier_bytes"] == 0
    assert table[Segment(2, 5)]["barrier_bytes"] > 0


def test_shape_columns_follow_the_config_and_nothing_else():
    small, large = plan_features([0], LayerConfig(1, 32)), plan_features([0], LayerConfig(64, 512))
    assert column(small, "log2_tokens")[0] == 5 and column(large, "log2_tokens")[0] == 15
    structure = [i for i, n in enumerate(feature_names()) if n.startswith(("cut_", "span_op", "kernel_count"))]
    assert np.array_equal(small[:, structure], large[:, structure])


def test_analytic_estimate_grows_with_the_shape():
    plans = all_canonical_masks()[::97]
    assert (estimate_us(plans, LayerConfig(64, 512)) > estimate_us(plans, LayerConfig(1, 128))).all()


@pytest.mark.parametrize("bad", [-1, 1 << 16])
def test_out_of_range_mask_is_refused_with_the_limit(bad):
    with pytest.raises(MaskError, match="65535"):
        plan_features([bad], CFG)
