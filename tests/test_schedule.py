"""How segments split into stages: epilogues, prologues, absorbed elementwise operators, barriers."""
from dataclasses import replace

from fusionsearch.plan import Segment, all_segments
from fusionsearch.schedule import (barrier_count, blocks_per_sm, few_item_stages, hopper_attention, hopper_gemm,
                                   prefetched_weights, stages_of, tensors_written)


def _shape(segment):
    return [(s.kind, s.ops) for s in stages_of(segment)]


def test_every_segment_is_covered_by_its_stages_in_order():
    for segment in all_segments():
        covered = [op for stage in stages_of(segment) for op in stage.ops]
        assert covered == list(segment.ops), segment.name


def test_elementwise_after_gemm_becomes_its_epilogue():
    assert _shape(Segment(10, 11)) == [("gemm", (10, 11))]
    assert _shape(Segment(0, 1)) == [("gemm", (0, 1))]
    assert stages_of(Segment(12, 13))[0].fuse_next


def test_merge_heads_before_out_gemm_is_a_prologue_without_barrier():
    (stage,) = stages_of(Segment(6, 7))
    assert stage.merge_prologue and stage.ops == (6, 7)
    assert barrier_count(Segment(6, 7)) == 0


def test_row_reduction_absorbs_the_elementwise_operator_before_it():
    assert _shape(Segment(8, 9)) == [("rowwise", (8, 9))]
    assert _shape(Segment(3, 4)) == [("rowwise", (3, 4))]
    assert stages_of(Segment(13, 14))[0].absorb_prev


def test_attention_flag_runs_ops_2_to_5_as_one_flash_stage():
    assert _shape(Segment(2, 5, True)) == [("attention", (2, 3, 4, 5))]
    assert _shape(Segment(2, 5)) == [("gemm", (2, 3)), ("rowwise", (4,)), ("gemm", (5,))]


def test_attention_takes_the_qkv_split_before_it_as_a_prologue():
    (stage,) = stages_of(Segment(1, 6, True))
    assert stage.kind == "attention" and stage.ops == (1, 2, 3, 4, 5, 6)
    assert stage.split_prologue and stage.merge_heads
    assert barrier_count(Segment(1, 6, True)) == 0
    assert tensors_written([Segment(1, 5, True)]) == {"ctx_heads"}  # the split layout is never written
    # After the QKV GEMM the split stays its epilogue: the GEMM writes the head layout either way.
    assert _shape(Segment(0, 5, True)) == [("gemm", (0, 1)), ("attention", (2, 3, 4, 5))]
    assert not stages_of(Segment(2, 6, True))[0].split_prologue


def test_cross_block_dependencies_need_grid_barriers():
    assert barrier_count(Segment(7, 10)) == 2  # GEMM+bias_residual | LayerNorm | GEMM
    assert barrier_count(Segment(0, 14, True)) == 6
    assert barrier_count(Segment(4, 4)) == 0


def test_runtime_allocates_exactly_what_stages_write():
    assert tensors_written([Segment(0, 14, True)]) == {"qkv_heads", "ctx", "attn_res", "attn_out", "ffn_act",
                                                       "ffn_res", "out"}
    assert "probs" in tensors_written([Segment(2, 5)])


def test_hopper_gemm_segments_are_exactly_a_linear_gemm_with_its_epilogue():
    hopper = {seg.name: hopper_gemm(seg).op for seg in all_segments() if hopper_gemm(seg)}
    assert hopper == {"seg_07_08": 7, "seg_10_11": 10, "seg_12_13": 12}
    assert hopper_gemm(Segment(6, 8)) is None  # merge-heads prologue: CUTLASS reads plain rows only
    assert hopper_gemm(Segment(10, 10)) is None  # a lone GEMM goes to cuBLAS
    assert hopper_gemm(Segment(0, 1)) is None  # the QKV split writes a head layout


def test_hopper_attention_segments_are_the_attention_stage_alone():
    hopper = {seg.name for seg in all_segments() if hopper_attention(seg)}
    assert hopper == {"seg_01_05_fa", "seg_01_06_fa", "seg_02_05_fa", "seg_02_06_fa"}
    assert hopper_attention(Segment(2, 7, True)) is None  # the output GEMM shares the kernel
    assert hopper_attention(Segment(2, 5)) is None  # no attention flag: scores are materialised
    assert all(hopper_attention(seg).kind == "attention" for seg in all_segments() if hopper_attention(seg))


def test_weights_of_later_gemm_stages_are_prefetched_at_kernel_start():
    assert prefetched_weights(Segment(0, 14, True)) == (7, 10, 12)  # the QKV GEMM loads its own at once
    assert prefetched_weights(Segment(8, 14)) == (10, 12)  # LayerNorm runs first
    assert prefetched_weights(Segment(2, 7)) == (7,)  # Q·Kᵀ and P·V multiply activations, not weights
    assert prefetched_weights(Segment(10, 11)) == ()
    for segment in all_segments():
        assert len(prefetched_weights(segment)) <= barrier_count(segment)


def test_attention_alone_in_its_kernel_runs_32_rows_per_warp_at_one_block_per_sm():
    for segment in (Segment(2, 5, True), Segment(2, 6, True), Segment(1, 6, True)):
        assert stages_of(segment)[0].rows_per_warp == 32 and blocks_per_sm(segment) == 1
    # Inside a multi-stage kernel it keeps 16 rows, so the other stages keep two blocks per SM.
    attention = [s for s in stages_of(Segment(1, 9, True)) if s.kind == "attention"]
    assert attention[0].rows_per_warp == 16 and blocks_per_sm(Segment(1, 9, True)) == 2
    assert all(blocks_per_sm(segment) == 2 for segment in all_segments() if not segment.attention)


def test_only_lone_attention_has_a_few_item_kernel_of_64_row_items_at_two_blocks_per_sm():
    for segment in all_segments():
        few = few_item_stages(segment)
        alone = len(stages_of(segment)) == 1 and stages_of(segment)[0].kind == "attention"
        assert (few is not None) == alone, segment.name
        if few:
            assert (few[0].rows_per_warp, few[0].warp_groups, blocks_per_sm(few)) == (16, 2, 2)
            assert replace(few[0], rows_per_warp=32) == stages_of(segment)[0]  # same operators, same fusion
    assert stages_of(Segment(2, 5, True))[0].warp_groups == 2
    assert stages_of(Segment(1, 9, True))[1].warp_groups == 1


def test_resident_weight_stages_hold_the_layer_gemms_and_keep_layernorm_9_a_stage_of_its_own():
    from fusionsearch.schedule import resident_weight_ops, resident_weight_stages

    whole = resident_weight_stages(Segment(0, 14, True))
    assert resident_weight_ops(whole) == (0, 7, 10, 12)
    ffn1 = next(stage for stage in whole if stage.op == 10)
    assert ffn1.ops == (10, 11) and ffn1.resident_weights
    assert len(whole) == len(stages_of(Segment(0, 14, True)))
    # LayerNorm 9 that absorbs the bias + residual before it keeps its own stage; no layer GEMM, no kernel.
    absorbing = resident_weight_stages(Segment(8, 12))
    assert absorbing[0].kind == "rowwise" and resident_weight_ops(absorbing) == (10, 12)
    assert resident_weight_stages(Segment(1, 6, True)) is None
    assert blocks_per_sm(whole) == 1


def test_resident_output_gemm_and_ffn2_leave_their_k_splits_to_the_layernorm_after_them():
    from fusionsearch.schedule import resident_weight_stages

    whole = resident_weight_stages(Segment(0, 14, True))
    out, norm_9 = whole[2:4]
    *_, ffn2, norm_14 = whole
    assert (out.op, out.ops, out.fuse_next, out.splits_to_next) == (7, (7,), False, True)
    assert (norm_9.op, norm_9.ops, norm_9.absorb_prev, norm_9.sums_splits) == (9, (8, 9), True, True)
    assert (ffn2.op, ffn2.ops, ffn2.fuse_next, ffn2.splits_to_next) == (12, (12,), False, True)
    assert (norm_14.op, norm_14.ops, norm_14.absorb_prev, norm_14.sums_splits) == (14, (13, 14), True, True)
    # With the merge-heads prologue the GEMM keeps operator 6.
    merged = resident_weight_stages(Segment(6, 9))
    assert [(s.ops, s.splits_to_next, s.sums_splits) for s in merged] == [((6, 7), True, False), ((8, 9), False, True)]
    # Without the LayerNorm in the kernel the GEMM adds its splits itself and keeps its epilogue.
    for first, last in ((12, 13), (7, 8)):
        (alone,) = [s for s in resident_weight_stages(Segment(first, last)) if s.op == first]
        assert alone.fuse_next and not alone.splits_to_next
    # The tiled kernel of the same segment is unchanged.
    assert stages_of(Segment(0, 14, True))[-2].ops == (12, 13)
