"""Plan features for the cost model: per-segment facts aggregated into one fixed-length vector per plan.

Every feature is a function of the canonical plan and the LayerConfig, so two masks that denote the same plan
get identical rows. Per segment (one kernel) we compute, from `ops.OPS` and `ops.tensor_bytes`:

| segment fact | meaning |
|---|---|
| span | operators in the kernel |
| kind counts | operators of each `ops.OpKind` |
| GEMMs | GEMM + batched GEMM count; the flash attention kernel (ops 2–5, attention flag) counts as one GEMM |
| reductions | row reductions (softmax, LayerNorm); inside the flash kernel the softmax does not count |
| gemm→reduction | a GEMM followed (anywhere later) by a row reduction: the row is wider than one GEMM tile |
| reduction→gemm | a GEMM after a full-row reduction |
| two GEMMs | two GEMMs: the second needs whole rows of the first's output |
| barriers | grid-wide barriers of the persistent kernel: before a GEMM when the current stage already holds a GEMM or a reduction, before a reduction when it holds a GEMM (DESIGN §5) |
| boundary bytes | tensors read from outside the kernel (weights, x, earlier kernels' outputs) + tensors it writes that later kernels or the layer output need, each tensor counted once |
| barrier bytes | tensors live across a grid barrier, written and read once each (they mostly stay in L2) |
| FLOPs | sum of the operators' FLOPs |

Per plan (`feature_names()` order; "kernels" = segments):

| feature | meaning |
|---|---|
| attention | pos0, the hand-written flash attention kernel |
| kernel_count, fused_kernel_count, singleton_count, max_span | how the 15 operators are grouped |
| gemm_kernels, max_gemms_per_kernel | kernels that contain a GEMM; the most GEMMs in one kernel |
| barrier_kernels, barriers | kernels that need ≥ 1 grid barrier; total grid barriers |
| gemm_then_reduction_kernels, reduction_then_gemm_kernels, two_gemm_kernels | kernels with each barrier cause |
| fused_<kind> (5) | operators of that OpKind that run inside a fused (span ≥ 2) kernel |
| cut_01 … cut_14 | 1 where the boundary between operator b−1 and b is cut (canonical: never inside flash attention) |
| span_op00 … span_op14 | span of the kernel that runs operator k |
| coop_op00 … coop_op14 | 1 where the kernel that runs operator k has grid barriers (a persistent cooperative kernel) |
| log_boundary_bytes, log_barrier_bytes, log_flops | natural logs of the totals (log1p for barrier bytes, often 0) |
| coop_gemm_flop_share | share of the layer's FLOPs done by GEMMs inside kernels with grid barriers |
| log_t_coop_gemm_us | log1p of those GEMM FLOPs / PEAK, µs: cooperative kernels rarely reach cuBLAS speed |
| log_t_compute_us, log_t_memory_us | FLOPs / PEAK and boundary bytes / BANDWIDTH, µs |
| log_t_segments_us | Σ over kernels of max(FLOPs / PEAK, (boundary + barrier bytes) / BANDWIDTH), µs |
| log_t_estimate_us | log_t_segments_us + kernels × KERNEL_OVERHEAD_US + barriers × BARRIER_US, the analytic estimate |
| log2_batch, log2_seq_len, log2_tokens, log2_hidden, log2_ffn, log2_heads, log2_head_size, element_bytes | shape |

PEAK, BANDWIDTH and BARRIER_US are the H100 numbers of DESIGN §6; they only set the scale of the roofline terms,
the trees learn the rest. KERNEL_OVERHEAD_US is an assumption (fill/drain of one kernel inside a CUDA graph), not a
measurement; the cost model learns the correction from data.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import numpy as np

from .config import LayerConfig
from .errors import MaskError
from .ops import ATTENTION_OPS, NUM_OPS, OPS, OpKind, tensor_bytes
from .plan import ATTENTION_BIT, Plan, Segment, all_segments

FEATURE_SCHEMA = 1  # bump when a feature's meaning or order changes: saved models check it

PEAK_TFLOPS = 767.0      # H100 fp16 dense matmul, measured (DESIGN §6)
BANDWIDTH_TBS = 3.0      # H100 copy bandwidth, measured (DESIGN §6)
BARRIER_US = 1.1         # one grid-wide barrier, measured (DESIGN §6)
KERNEL_OVERHEAD_US = 2.0  # assumed per-kernel fill/drain inside a CUDA graph; launch itself is 0.08 µs

ATTN_FIRST, ATTN_LAST = ATTENTION_OPS
_KINDS = tuple(OpKind)
_SEGMENTS = all_segments()
_SEGMENT_INDEX = {seg: i for i, seg in enumerate(_SEGMENTS)}

# Columns of the per-segment table (one row per distinct segment kernel).
_SEG_COLUMNS = ("span", "fused", "gemms", "reductions", "gemm_then_reduction", "reduction_then_gemm", "two_gemms",
                "barriers", "boundary_bytes", "barrier_bytes", "flops", "gemm_flops",
                *(f"n_{kind.value}" for kind in _KINDS))
_COL = {name: i for i, name in enumerate(_SEG_COLUMNS)}

_STRUCTURE = ("attention", "kernel_count", "fused_kernel_count", "singleton_count", "max_span",
              "gemm_kernels", "max_gemms_per_kernel", "barrier_kernels", "barriers",
              "gemm_then_reduction_kernels", "reduction_then_gemm_kernels", "two_gemm_kernels",
              *(f"fused_{kind.value}" for kind in _KINDS))
_CUTS = tuple(f"cut_{b:02d}" for b in range(1, NUM_OPS))
_SPANS = tuple(f"span_op{k:02d}" for k in range(NUM_OPS))
_COOP = tuple(f"coop_op{k:02d}" for k in range(NUM_OPS))
_COSTS = ("log_boundary_bytes", "log_barrier_bytes", "log_flops", "coop_gemm_flop_share", "log_t_coop_gemm_us",
          "log_t_compute_us", "log_t_memory_us", "log_t_segments_us", "log_t_estimate_us")
_SHAPE = ("log2_batch", "log2_seq_len", "log2_tokens", "log2_hidden", "log2_ffn", "log2_heads", "log2_head_size",
          "element_bytes")
_NAMES = (*_STRUCTURE, *_CUTS, *_SPANS, *_COOP, *_COSTS, *_SHAPE)
ESTIMATE_COLUMN = _NAMES.index("log_t_estimate_us")


def feature_names() -> list[str]:
    """Names of the plan_features columns, in order."""
    return list(_NAMES)


# --- per segment ---------------------------------------------------------------------------------------------

_PRODUCER = {op.output: op.index for op in OPS}
_CONSUMERS: dict[str, set[int]] = {}
for _op in OPS:
    for _name in _op.inputs:
        _CONSUMERS.setdefault(_name, set()).add(_op.index)


def _stages(seg: Segment) -> list[tuple[str, tuple[int, ...]]]:
    """The segment as a sequence of (role, ops): the flash kernel's ops 2–5 collapse into one 'gemm' step."""
    steps: list[tuple[str, tuple[int, ...]]] = []
    for k in seg.ops:
        if seg.attention and ATTN_FIRST <= k <= ATTN_LAST:
            if k == ATTN_FIRST:
                steps.append(("gemm", tuple(range(ATTN_FIRST, ATTN_LAST + 1))))
            continue
        kind = OPS[k].kind
        role = "gemm" if OPS[k].is_gemm else "reduction" if kind is OpKind.ROW_REDUCTION else "pointwise"
        steps.append((role, (k,)))
    return steps


@lru_cache(maxsize=None)
def _segment_structure(seg: Segment) -> dict:
    """Shape-independent facts of one segment: counts, barrier causes, where the barriers fall."""
    steps = _stages(seg)
    roles = [role for role, _ in steps]
    gemm_at = [i for i, r in enumerate(roles) if r == "gemm"]
    red_at = [i for i, r in enumerate(roles) if r == "reduction"]
    barrier_before: list[int] = []  # first op index after each barrier
    stage_gemm = stage_red = False
    for role, ops in steps:
        needs = (role == "gemm" and (stage_gemm or stage_red)) or (role == "reduction" and stage_gemm)
        if needs:
            barrier_before.append(ops[0])
            stage_gemm = stage_red = False
        stage_gemm |= role == "gemm"
        stage_red |= role == "reduction"
    counts = {kind: sum(OPS[k].kind is kind for k in seg.ops) for kind in _KINDS}
    return {
        "gemms": len(gemm_at),
        "reductions": len(red_at),
        "gemm_then_reduction": any(g < r for g in gemm_at for r in red_at),
        "reduction_then_gemm": any(r < g for g in gemm_at for r in red_at),
        "two_gemms": len(gemm_at) >= 2,
        "barrier_before": tuple(barrier_before),
        "counts": counts,
    }


def _segment_bytes(seg: Segment, cfg: LayerConfig) -> tuple[int, int]:
    """(boundary bytes, barrier bytes) of one segment, each tensor counted once per crossing."""
    inside = set(seg.ops)
    reads = {name for k in seg.ops for name in OPS[k].inputs if _PRODUCER.get(name) not in inside}
    writes = {OPS[k].output for k in seg.ops
              if OPS[k].output == "out" or _CONSUMERS.get(OPS[k].output, set()) - inside}
    boundary = sum(tensor_bytes(n, cfg) for n in reads | writes)
    barrier = 0
    for cut in _segment_structure(seg)["barrier_before"]:
        live = {name for k in seg.ops if k >= cut for name in OPS[k].inputs
                if _PRODUCER.get(name) in inside and _PRODUCER[name] < cut}
        barrier += 2 * sum(tensor_bytes(n, cfg) for n in live)
    return boundary, barrier


@lru_cache(maxsize=64)
def _segment_table(cfg: LayerConfig) -> np.ndarray:
    """One row of _SEG_COLUMNS per segment of all_segments(), for this config."""
    table = np.zeros((len(_SEGMENTS), len(_SEG_COLUMNS)))
    for i, seg in enumerate(_SEGMENTS):
        facts = _segment_structure(seg)
        boundary, barrier = _segment_bytes(seg, cfg)
        row = {
            "span": seg.span, "fused": seg.fused, "gemms": facts["gemms"], "reductions": facts["reductions"],
            "gemm_then_reduction": facts["gemm_then_reduction"], "reduction_then_gemm": facts["reduction_then_gemm"],
            "two_gemms": facts["two_gemms"], "barriers": len(facts["barrier_before"]),
            "boundary_bytes": boundary, "barrier_bytes": barrier,
            "flops": sum(OPS[k].flops(cfg) for k in seg.ops),
            "gemm_flops": sum(OPS[k].flops(cfg) for k in seg.ops if OPS[k].is_gemm),
            **{f"n_{kind.value}": n for kind, n in facts["counts"].items()},
        }
        table[i] = [float(row[c]) for c in _SEG_COLUMNS]
    table.setflags(write=False)
    return table


def segment_table(cfg: LayerConfig) -> dict[Segment, dict[str, float]]:
    """The per-segment facts for every segment kernel, for inspection and tests."""
    table = _segment_table(cfg)
    return {seg: dict(zip(_SEG_COLUMNS, table[i].tolist(), strict=True)) for i, seg in enumerate(_SEGMENTS)}


# --- per plan, vectorised over masks ---------------------------------------------------------------------------

_KIND_OF_OP = np.array([_KINDS.index(op.kind) for op in OPS])
_LUT = np.full((NUM_OPS, NUM_OPS, 2), -1, dtype=np.int64)
for _seg, _i in _SEGMENT_INDEX.items():
    _LUT[_seg.first, _seg.last, int(_seg.attention)] = _i


def _as_masks(plans: "Iterable[Plan | int] | np.ndarray") -> np.ndarray:
    if isinstance(plans, np.ndarray):
        masks = plans.astype(np.int64, copy=False).ravel()
    else:
        masks = np.fromiter((p.mask if isinstance(p, Plan) else int(p) for p in plans), dtype=np.int64)
    if masks.size and (masks.min() < 0 or masks.max() > 0xFFFF):
        bad = masks[(masks < 0) | (masks > 0xFFFF)][0]
        raise MaskError(f"mask {bad} is outside 0 … 65535; give 16-bit masks or Plan objects")
    return masks


def _structure(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(attention [P], cut [P, 15] with column b = boundary b, segment index per op [P, 15], op starts a kernel)."""
    attention = (masks >> ATTENTION_BIT) & 1
    bits = (masks[:, None] >> (14 - np.arange(NUM_OPS))[None, :]) & 1
    cut = np.zeros((len(masks), NUM_OPS), dtype=bool)
    cut[:, 1:] = bits[:, 1:] != bits[:, :-1]
    cut[:, ATTN_FIRST + 1:ATTN_LAST + 1] &= attention[:, None] == 0
    ops = np.arange(NUM_OPS)
    first = np.maximum.accumulate(np.where(cut, ops, 0), axis=1)
    ends = np.full_like(cut, NUM_OPS - 1, dtype=np.int64)
    ends[:, :-1] = np.where(cut[:, 1:], ops[:-1], NUM_OPS - 1)
    last = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    in_attn = (attention[:, None] == 1) & (first <= ATTN_FIRST) & (last >= ATTN_LAST)
    seg_index = _LUT[first, last, in_attn.astype(np.int64)]
    return attention, cut, seg_index, first == ops


def canonical_masks(plans: "Iterable[Plan | int] | np.ndarray") -> np.ndarray:
    """Canonical mask (= canonical plan id) of each mask or plan, vectorised; equals Plan.mask."""
    masks = _as_masks(plans)
    attention, cut, _, _ = _structure(masks)
    bits = np.cumsum(cut, axis=1) & 1  # operator 0's bit is 0 and bits flip exactly at cuts
    return (attention << ATTENTION_BIT) | (bits << (14 - np.arange(NUM_OPS))).sum(axis=1)


def segment_incidence(plans: "Iterable[Plan | int] | np.ndarray") -> np.ndarray:
    """Boolean [len(plans), len(all_segments())]: which segment kernels each plan launches."""
    masks = _as_masks(plans)
    _, _, seg_index, starts = _structure(masks)
    out = np.zeros((len(masks), len(_SEGMENTS)), dtype=bool)
    rows = np.repeat(np.arange(len(masks)), starts.sum(axis=1))
    out[rows, seg_index[starts]] = True
    return out


def all_canonical_masks() -> np.ndarray:
    """The 18,432 canonical plan ids in ascending order."""
    return _all_canonical().copy()


@lru_cache(maxsize=1)
def _all_canonical() -> np.ndarray:
    return np.unique(canonical_masks(np.arange(1 << 16)))


def plan_features(plans: "Iterable[Plan | int] | np.ndarray", cfg: LayerConfig) -> np.ndarray:
    """Feature matrix [len(plans), len(feature_names())] (float64) for Plans or masks under one config."""
    masks = _as_masks(plans)
    table = _segment_table(cfg)
    attention, cut, seg_index, starts = _structure(masks)
    rows = table[seg_index]                       # [P, 15 ops, columns]: the kernel that runs each op
    per_kernel = rows * starts[:, :, None]        # each kernel counted once, at its first op
    total = per_kernel.sum(axis=1)
    col = lambda name: total[:, _COL[name]]  # noqa: E731
    span = rows[:, :, _COL["span"]]
    kernels = starts.sum(axis=1)
    fused_kernels = (per_kernel[:, :, _COL["fused"]]).sum(axis=1)
    in_fused = rows[:, :, _COL["fused"]]
    fused_kind = [(in_fused * (_KIND_OF_OP == j)).sum(axis=1) for j in range(len(_KINDS))]
    barrier_kernels = (per_kernel[:, :, _COL["barriers"]] > 0).sum(axis=1)
    coop_gemm_flops = (per_kernel[:, :, _COL["gemm_flops"]] * (rows[:, :, _COL["barriers"]] > 0)).sum(axis=1)

    flops = col("flops")
    boundary = col("boundary_bytes")
    barrier_bytes = col("barrier_bytes")
    seg_time = np.maximum(rows[:, :, _COL["flops"]] / (PEAK_TFLOPS * 1e6),
                          (rows[:, :, _COL["boundary_bytes"]] + rows[:, :, _COL["barrier_bytes"]])
                          / (BANDWIDTH_TBS * 1e6))
    t_segments = (seg_time * starts).sum(axis=1)
    t_estimate = t_segments + kernels * KERNEL_OVERHEAD_US + col("barriers") * BARRIER_US

    n = len(masks)
    shape = np.log2([cfg.batch, cfg.seq_len, cfg.tokens, cfg.hidden, cfg.ffn, cfg.heads, cfg.head_size])
    columns = [
        attention, kernels, fused_kernels, kernels - fused_kernels, span.max(axis=1),
        (per_kernel[:, :, _COL["gemms"]] > 0).sum(axis=1), rows[:, :, _COL["gemms"]].max(axis=1),
        barrier_kernels, col("barriers"),
        col("gemm_then_reduction"), col("reduction_then_gemm"), col("two_gemms"),
        *fused_kind,
        *cut[:, 1:].T, *span.T, *(rows[:, :, _COL["barriers"]] > 0).T,
        np.log(boundary), np.log1p(barrier_bytes), np.log(flops), coop_gemm_flops / flops,
        np.log1p(coop_gemm_flops / (PEAK_TFLOPS * 1e6)),
        np.log(flops / (PEAK_TFLOPS * 1e6)), np.log(boundary / (BANDWIDTH_TBS * 1e6)),
        np.log(t_segments), np.log(t_estimate),
        *(np.full(n, v) for v in shape), np.full(n, float(cfg.element_bytes)),
    ]
    out = np.column_stack([np.asarray(c, dtype=np.float64) for c in columns]) if n else np.zeros((0, len(_NAMES)))
    assert out.shape[1] == len(_NAMES), "feature columns and feature_names() disagree"
    return out


def estimate_us(plans: "Iterable[Plan | int] | np.ndarray", cfg: LayerConfig) -> np.ndarray:
    """The analytic latency estimate (exp of log_t_estimate_us) that the cost model corrects."""
    return np.exp(plan_features(plans, cfg)[:, ESTIMATE_COLUMN])
