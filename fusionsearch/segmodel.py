"""Segment latency model: each segment kernel's latency alone as a non-negative function of the shape, fitted on
the segment records of other shapes; a plan's prediction is the sum over its kernels.

Why this shape of model: on the recorded H100 sweeps a plan's latency is close to the sum of its kernels timed
alone (choosing plans by that sum finds the true optimum within 1.6 % at all seven shapes), so what has to
transfer to an unseen shape is the latency of ~150 kernels, not of 18,432 plans. Each kernel gets three terms with
non-negative weights, fitted for relative error:

| kernel | terms |
|---|---|
| generated or cuBLAS | 1 (launch and fill), tokens (rows streamed), tokens × seq_len (the S×S score tensors) |
| flash attention | 1, tokens (the Q/K/V split and merge it may absorb), key tiles × waves (its latency-bound chain) |

"key tiles × waves" is ⌈S / 64⌉ sequential key tiles per block times ⌈B · heads · ⌈S / 128⌉ / (2 · SMs)⌉ waves of
blocks (kernels/fs_attention.cuh: 128 query rows per block, 64-key tiles; two blocks per SM). A FLOP count misses
that at batch 1 the kernel has 12 blocks for 132 SMs, which is where the flash kernel stops paying.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from .config import LayerConfig
from .errors import FusionSearchError
from .features import segment_incidence
from .plan import Plan, Segment, all_segments

MODEL_KIND = "segment-latency"
SCHEMA = 1
MIN_SHAPES = 3  # three terms per kernel
FLASH_QUERY_ROWS = 128
FLASH_KEY_TILE = 64
BLOCKS_PER_SM = 2
DEFAULT_SM_COUNT = 132  # H100 SXM, when records do not say


class SegmentModelError(FusionSearchError):
    """Segment records that cannot train the model (too few shapes, a kernel never measured)."""


def segment_terms(segment: Segment, cfg: LayerConfig, sm_count: int) -> np.ndarray:
    """The three non-negative terms of one kernel's latency at cfg (see the module table)."""
    tokens = cfg.batch * cfg.seq_len
    if segment.attention:
        blocks = cfg.batch * cfg.heads * math.ceil(cfg.seq_len / FLASH_QUERY_ROWS)
        waves = math.ceil(blocks / (BLOCKS_PER_SM * sm_count))
        return np.array([1.0, tokens / 1e4, math.ceil(cfg.seq_len / FLASH_KEY_TILE) * waves])
    return np.array([1.0, tokens / 1e4, tokens * cfg.seq_len / 1e6])


def _segment_keys() -> dict[str, int]:
    from .records import key_of

    return {key_of(segment): i for i, segment in enumerate(all_segments())}


def _nnls_relative(terms: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Non-negative weights w minimising Σ ((terms·w − y) / y)²."""
    from scipy.optimize import nnls

    weights, _ = nnls(terms / latency[:, None], np.ones_like(latency))
    return weights


class SegmentLatencyModel:
    """Per-kernel non-negative latency terms; predict() sums a plan's kernels."""

    def __init__(self, weights: np.ndarray, sm_count: int, shapes: list[str], measured: np.ndarray) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)  # [segments, 3] in all_segments() order
        self.sm_count = int(sm_count)
        self.shapes = list(shapes)
        self.measured = np.asarray(measured, dtype=bool)  # False: the kernel never ran ok at a training shape

    @classmethod
    def fit(cls, records: pd.DataFrame) -> "SegmentLatencyModel":
        """Fit on kind=segment, status=ok records of ≥ MIN_SHAPES shapes of one layer size and dtype."""
        from .costmodel import SHAPE_COLUMNS, layer_config  # costmodel imports this module

        rows = records[(records["kind"] == "segment") & (records["status"] == "ok")].dropna(subset=["latency_us"])
        keys = _segment_keys()
        rows = rows[rows["key"].isin(keys)]
        shape_cols = list(SHAPE_COLUMNS)
        medians = rows.groupby([*shape_cols, "key"], sort=True)["latency_us"].median().reset_index()
        shapes = medians[shape_cols].drop_duplicates()
        if len(shapes) < MIN_SHAPES:
            raise SegmentModelError(f"segment records of {len(shapes)} shape(s); the segment model needs "
                                    f"{MIN_SHAPES} or more (sweep segments with `fusionsearch bench --segments`)")
        sm_count = DEFAULT_SM_COUNT
        if "gpu_sm_count" in rows:
            counts = pd.to_numeric(rows["gpu_sm_count"], errors="coerce")
            counts = counts[counts > 0]
            sm_count = int(counts.iloc[0]) if len(counts) else DEFAULT_SM_COUNT
        configs = {tuple(row): layer_config(dict(zip(shape_cols, row))) for row in shapes.itertuples(index=False)}
        segments = all_segments()
        weights = np.zeros((len(segments), 3))
        for key, group in medians.groupby("key", sort=False):
            index = keys[key]
            cfgs = [configs[tuple(r)] for r in group[shape_cols].itertuples(index=False)]
            terms = np.stack([segment_terms(segments[index], cfg, sm_count) for cfg in cfgs])
            weights[index] = _nnls_relative(terms, group["latency_us"].to_numpy(dtype=np.float64))
        measured = np.zeros(len(segments), dtype=bool)
        measured[[keys[k] for k in medians["key"].unique()]] = True
        return cls(weights, sm_count, [configs[k].shape_text for k in configs], measured)

    def segment_latency(self, cfg: LayerConfig) -> np.ndarray:
        """Predicted µs of every segment kernel alone at cfg, in all_segments() order."""
        terms = np.stack([segment_terms(s, cfg, self.sm_count) for s in all_segments()])
        latency = np.maximum((terms * self.weights).sum(axis=1), 1e-3)
        # A kernel that never ran ok (failed to build, wrong answer) prices its plans out: twice the slowest.
        latency[~self.measured] = 2.0 * latency[self.measured].max()
        return latency

    def predict(self, plans: "Iterable[Plan | int] | np.ndarray", cfg: LayerConfig) -> np.ndarray:
        """Predicted µs of each plan: the sum of its kernels' predicted latencies."""
        return segment_incidence(plans).astype(np.float64) @ self.segment_latency(cfg)

    def to_json(self) -> dict:
        return {"kind": MODEL_KIND, "schema": SCHEMA, "sm_count": self.sm_count, "shapes": self.shapes,
                "segments": [s.name for s in all_segments()], "weights": self.weights.tolist(),
                "measured": self.measured.tolist()}

    @classmethod
    def from_json(cls, data: dict, source: str = "model") -> "SegmentLatencyModel":
        names = [s.name for s in all_segments()]
        if data.get("kind") != MODEL_KIND or data.get("schema") != SCHEMA or data.get("segments") != names:
            raise SegmentModelError(f"{source} holds a segment model of kind {data.get('kind')!r}, schema "
                                    f"{data.get('schema')!r} over {len(data.get('segments') or [])} segments; this "
                                    f"fusionsearch reads {MODEL_KIND!r} schema {SCHEMA} over {len(names)}; retrain")
        return cls(np.array(data["weights"], dtype=np.float64), data["sm_count"], data.get("shapes", []),
                   np.array(data["measured"], dtype=bool))


def has_segment_shapes(records: pd.DataFrame, minimum: int = MIN_SHAPES) -> bool:
    """Whether records hold ok segment measurements of at least `minimum` shapes."""
    if "kind" not in records or records.empty:
        return False
    from .costmodel import SHAPE_COLUMNS  # costmodel imports this module

    rows = records[(records["kind"] == "segment") & (records["status"] == "ok")]
    return len(rows[list(SHAPE_COLUMNS)].drop_duplicates()) >= minimum
