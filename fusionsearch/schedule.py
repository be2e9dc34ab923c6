"""Segment → stages: how the operators of one fused segment share a kernel.

Inside a segment, an operator joins its neighbour's stage where the data stays in the thread block:
  * the elementwise/layout operator after a GEMM becomes its epilogue (bias+split, scale+mask, merge heads,
    bias+residual, bias+GELU);
  * merge_heads before out_gemm becomes the GEMM's A-operand addressing (prologue);
  * the elementwise operator before a row reduction is applied as the row is loaded (scale+mask before
    softmax, bias+residual before LayerNorm);
  * with the attention flag, operators 2–5 (and merge_heads after them) are one flash-attention stage, which
    also takes qkv_bias_split before it as its prologue (it reads the QKV GEMM's rows and adds the bias).
Every other dependency crosses thread blocks, so consecutive stages are separated by a grid-wide barrier
and the segment runs as one cooperative persistent kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .ops import OPS, OpKind
from .plan import ATTN_FIRST, ATTN_LAST, Segment

_QKV_SPLIT = 1
# GEMM → the following operator it can take as an epilogue.
_EPILOGUE_OF = {0: 1, 2: 3, 5: 6, 7: 8, 10: 11, 12: 13}
# Row reduction → the elementwise operator before it that it applies on load.
_ABSORBED_BY = {4: 3, 9: 8, 14: 13}
_MERGE_HEADS, _OUT_GEMM, _FFN2_GEMM = 6, 7, 12
# GEMMs whose GEMM + epilogue segment Hopper runs through CUTLASS at many rows (kernels/fs_gemm_sm90.cuh).
_HOPPER_SEGMENT_GEMMS = (7, 10, 12)
# GEMMs that multiply by a weight matrix (the others multiply activations).
_WEIGHT_GEMMS = (0, 7, 10, 12)
# Resident GEMMs whose K is split over blocks (ResidentGemm::SPLITS, one where the width allows no more), each
# followed by bias + residual and a LayerNorm that can add the splits.
_SPLIT_GEMMS = (_OUT_GEMM, _FFN2_GEMM)


@dataclass(frozen=True)
class Stage:
    """One grid-wide phase of a segment kernel; `op` names the C++ stage instantiation."""

    kind: str  # "gemm" | "elementwise" | "rowwise" | "attention"
    op: int
    ops: tuple[int, ...]
    fuse_next: bool = False  # gemm: epilogue of the next operator
    merge_prologue: bool = False  # gemm 7: read ctx_heads as merged rows
    absorb_prev: bool = False  # rowwise: apply the previous elementwise operator on load
    merge_heads: bool = False  # attention: store merged heads (operator 6)
    split_prologue: bool = False  # attention: read the QKV GEMM output and apply operator 1's bias on load
    rows_per_warp: int = 16  # attention: query rows per warp (32 needs a kernel of its own, one block per SM)
    warp_groups: int = 1  # attention: independent warp groups per block, each with its own item
    resident_weights: bool = False  # layer gemm: against the block's weight slice, loaded when the kernel starts
    splits_to_next: bool = False  # resident out/ffn2 gemm: its K splits' sums left for the LayerNorm stage after it
    sums_splits: bool = False  # rowwise LayerNorm 9/14: adds the GEMM's K splits instead of reading its output

    @property
    def writes(self) -> str:
        """The tensor (ops.py name) this stage materialises."""
        return OPS[self.ops[-1]].output


def uses_library_gemm(segment: Segment) -> bool:
    """A lone GEMM runs through cuBLAS (via ATen in the binding): nothing to fuse, and the library is faster."""
    return segment.span == 1 and OPS[segment.first].kind in (OpKind.GEMM, OpKind.BATCHED_GEMM)


def hopper_gemm(segment: Segment) -> "Stage | None":
    """The stage of a segment that is exactly out_gemm, ffn1_gemm or ffn2_gemm with its epilogue (no merge-heads
    prologue, nothing else), which sm_90 runs as a CUTLASS TMA + warpgroup-MMA GEMM; None for any other segment."""
    stages = stages_of(segment)
    if len(stages) != 1:
        return None
    stage = stages[0]
    fits = stage.kind == "gemm" and stage.op in _HOPPER_SEGMENT_GEMMS and stage.fuse_next and not stage.merge_prologue
    return stage if fits else None


def hopper_attention(segment: Segment) -> "Stage | None":
    """The stage of a segment that is the attention stage alone (with or without the QKV split before it and the
    merged-head store after it), which sm_90 runs on warpgroup MMAs from fs::sm90::kAttentionMinSeq keys on; None
    for any other segment."""
    stages = stages_of(segment)
    return stages[0] if len(stages) == 1 and stages[0].kind == "attention" else None


def stages_of(segment: Segment) -> tuple[Stage, ...]:
    """Split a segment into stages following the fusion rules in the module docstring."""
    stages: list[Stage] = []
    op = segment.first
    while op <= segment.last:
        if segment.attention and op == ATTN_FIRST:
            merge = segment.last > ATTN_LAST  # operator 6 follows inside the segment
            split = bool(stages) and stages[-1].ops == (_QKV_SPLIT,)
            if split:
                stages.pop()
            covered = ((_QKV_SPLIT,) if split else ()) + tuple(range(ATTN_FIRST, ATTN_LAST + 1 + merge))
            stages.append(Stage("attention", ATTN_FIRST, covered, merge_heads=merge, split_prologue=split))
            op = covered[-1] + 1
            continue
        kind = OPS[op].kind
        if kind in (OpKind.GEMM, OpKind.BATCHED_GEMM):
            fuse = _EPILOGUE_OF[op] <= segment.last
            prologue = op == _OUT_GEMM and stages and stages[-1].ops == (_MERGE_HEADS,)
            if prologue:
                stages.pop()
            covered = ((_MERGE_HEADS,) if prologue else ()) + (op,) + ((op + 1,) if fuse else ())
            stages.append(Stage("gemm", op, covered, fuse_next=fuse, merge_prologue=bool(prologue)))
            op = covered[-1] + 1
        elif kind == OpKind.ROW_REDUCTION:
            absorb = bool(stages) and stages[-1].kind == "elementwise" and stages[-1].ops == (_ABSORBED_BY[op],)
            if absorb:
                stages.pop()
            stages.append(Stage("rowwise", op, ((op - 1,) if absorb else ()) + (op,), absorb_prev=absorb))
            op += 1
        else:
            stages.append(Stage("elementwise", op, (op,)))
            op += 1
    if len(stages) == 1 and stages[0].kind == "attention":
        # Alone in its kernel, attention may take more registers: 32 rows per warp halve its shared-memory reads.
        stages[0] = replace(stages[0], rows_per_warp=32, warp_groups=2)
    return tuple(stages)


def blocks_per_sm(segment: "Segment | tuple[Stage, ...]") -> int:
    """The occupancy a segment kernel (or a kernel of these stages) is compiled for (its launch bounds): 1 where a
    stage needs more than 128 registers a thread, else 2."""
    stages = segment if isinstance(segment, tuple) else stages_of(segment)
    return 1 if any(stage.rows_per_warp > 16 or stage.resident_weights for stage in stages) else 2


def few_item_stages(segment: Segment) -> "tuple[Stage, ...] | None":
    """For attention alone in its kernel, the stages of a second kernel: 64-row items (two groups of four warps at
    16 query rows each) at two blocks per SM, so each item is half the 32-row kernel's and an SM holds four. The
    launch runs it when blocks of the 32-row kernel would fill at most half the SMs (B×S = 8×128 and below for
    BERT-base on an H100), where it halves the query rows per busy SM. None for every other segment."""
    stages = stages_of(segment)
    if len(stages) == 1 and stages[0].kind == "attention" and stages[0].rows_per_warp > 16:
        return (replace(stages[0], rows_per_warp=16, warp_groups=2),)
    return None


def resident_weight_stages(segment: Segment) -> "tuple[Stage, ...] | None":
    """For a segment with a layer GEMM (one with a weight matrix), the stages of a second kernel for few rows on
    sm_90: every block holds a slice of each of those weight matrices in shared memory, copied in when the kernel
    starts, so the weight stream runs under the stages and barriers before each GEMM (one block per SM). None for
    segments without a layer GEMM."""
    stages = stages_of(segment)
    if not any(_holds_weights(stage) for stage in stages):
        return None
    # LayerNorm 9 keeps its own stage: every FFN1 block normalising all rows as it loads them cost more than the
    # grid barrier it saved (experiments/NOTES.md).
    stages = [replace(stage, resident_weights=True) if _holds_weights(stage) else stage for stage in stages]
    # The output GEMM and FFN2 split K over four blocks a column (kernels/fs_gemm_resident.cuh); rather than have
    # the last of them add the four partial sums after an atomic round trip, and then apply the bias and residual,
    # each leaves the sums to the LayerNorm after the grid barrier, which adds them with the bias + residual
    # operator (8 or 13) as it loads its rows.
    for i, (gemm, norm) in enumerate(zip(stages, stages[1:])):
        if gemm.op in _SPLIT_GEMMS and gemm.fuse_next and norm.kind == "rowwise" and norm.ops == (gemm.op + 2,):
            stages[i] = replace(gemm, ops=gemm.ops[:-1], fuse_next=False, splits_to_next=True)
            stages[i + 1] = replace(norm, ops=(gemm.op + 1, gemm.op + 2), absorb_prev=True, sums_splits=True)
    return tuple(stages)


def resident_weight_ops(stages: tuple[Stage, ...]) -> tuple[int, ...]:
    """The GEMM operators whose weights a kernel of these stages keeps resident, in stage order."""
    return tuple(stage.op for stage in stages if stage.resident_weights)


def _holds_weights(stage: Stage) -> bool:
    return stage.kind == "gemm" and stage.op in _WEIGHT_GEMMS


def prefetched_weights(segment: Segment) -> tuple[int, ...]:
    """The layer GEMMs whose weights a segment kernel asks L2 for when it starts: every one after its first
    stage, so the weight stream runs under the stages and barriers before them."""
    return tuple(stage.op for stage in stages_of(segment)[1:] if stage.kind == "gemm" and stage.op in _WEIGHT_GEMMS)


def barrier_count(segment: Segment) -> int:
    """Grid-wide barriers the segment kernel needs (0 means an ordinary launch)."""
    return len(stages_of(segment)) - 1


def tensors_written(segments) -> set[str]:
    """Every intermediate tensor some stage of these segments writes (what the runtime must allocate)."""
    return {stage.writes for seg in segments for stage in stages_of(seg)}
