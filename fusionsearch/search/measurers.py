"""Measurers: replay a recorded sweep (CPU, for evaluation and tests) or measure on the GPU through bench."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import LayerConfig
from ..costmodel import SHAPE_COLUMNS, layer_config
from ..features import canonical_masks
from ..mask import decode
from ..plan import Segment
from .loop import Measurer, SearchError, Trial


def load_records(paths: "Sequence[str | Path] | str | Path") -> pd.DataFrame:
    """Records files (.jsonl or .jsonl.gz) → one frame; records.load_frame names a missing or foreign file."""
    from ..records import load_frame

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return load_frame([Path(p).expanduser() for p in paths])


def shape_rows(frame: pd.DataFrame, cfg: LayerConfig) -> pd.DataFrame:
    """The rows of frame measured under cfg's shape, layer sizes and dtype."""
    if frame.empty:
        return frame
    keep = np.ones(len(frame), dtype=bool)
    for column in SHAPE_COLUMNS:
        keep &= (frame[column] == getattr(cfg, column)).to_numpy()
    return frame[keep]


def config_from_records(frame: pd.DataFrame, batch: int, seq_len: int, dtype: str | None = None,
                        source: str = "records") -> LayerConfig:
    """The one layer config of shape batch×seq_len (and dtype) that a records frame holds plan records for."""
    plans = frame[(frame["kind"] == "plan")] if not frame.empty else frame
    rows = plans[(plans["batch"] == batch) & (plans["seq_len"] == seq_len)] if not plans.empty else plans
    if dtype is not None and not rows.empty:
        rows = rows[rows["dtype"] == dtype]
    if rows.empty:
        held = sorted({f"{b}x{s} {d}" for b, s, d in plans[["batch", "seq_len", "dtype"]].itertuples(index=False)}
                      ) if not plans.empty else []
        raise SearchError(f"{source} holds no kind=plan records for shape {batch}x{seq_len}"
                          f"{' ' + dtype if dtype else ''}; it holds {', '.join(held) or 'none'}; pick one of those")
    layers = rows[list(SHAPE_COLUMNS)].drop_duplicates()
    if len(layers) > 1:
        raise SearchError(f"{source} holds {len(layers)} layer configs for shape {batch}x{seq_len} "
                          f"({layers.to_dict('records')}); pass --dtype or split the file by layer")
    return layer_config(layers.iloc[0])


def _plan_keys(rows: pd.DataFrame) -> pd.Series:
    return pd.Series(canonical_masks(rows["canonical_id"].to_numpy(dtype=np.int64)), index=rows.index)


def _segment_keys(rows: pd.DataFrame) -> pd.Series:
    """The Segment of each kind=segment row, from its one-entry `segments` field [[first, last, attention]]."""
    keys = []
    for key, spans in zip(rows["key"], rows["segments"], strict=True):
        if not isinstance(spans, list) or len(spans) != 1:
            raise SearchError(f"segment record {key} has segments {spans!r}, not one [first, last, attention]; "
                              "the records file is damaged or of another format")
        first, last, attention = spans[0]
        keys.append(Segment(int(first), int(last), bool(attention)))
    return pd.Series(keys, index=rows.index, dtype=object)


def _outcomes(rows: pd.DataFrame, keys: pd.Series) -> dict:
    """key → (status, latency): the median of the ok records, else the status of the last record."""
    if rows.empty:
        return {}
    last = rows["status"].groupby(keys, sort=False).last()
    ok = rows["status"] == "ok"
    median = rows["latency_us"][ok].groupby(keys[ok], sort=False).median().dropna()
    return {key: ("ok", float(median[key])) if key in median.index else (str(status), None)
            for key, status in last.items()}


def trials_from_records(frame: pd.DataFrame, cfg: LayerConfig) -> list[Trial]:
    """Earlier measurements of cfg (plans and segments with a final status) as trials, for --resume."""
    rows = shape_rows(frame, cfg)
    plans, segments = rows[rows["kind"] == "plan"], rows[rows["kind"] == "segment"]
    # A plan or segment measured more than once is one trial (median of its ok records, else its last status).
    found = [(("plan", int(k)), v) for k, v in _outcomes(plans, _plan_keys(plans)).items()]
    found += [(("segment", k), v) for k, v in _outcomes(segments, _segment_keys(segments)).items()]
    trials = []
    for i, ((kind, key), (status, latency)) in enumerate(found):
        trials.append(Trial(i, status, latency, mask=key) if kind == "plan" else Trial(i, status, latency, segment=key))
    return trials


class ReplayMeasurer(Measurer):
    """Answers from the records of a recorded sweep of one shape: recorded latencies and recorded failures."""

    def __init__(self, frame: pd.DataFrame, cfg: LayerConfig, source: str = "replay") -> None:
        self.cfg = cfg
        self.source = source
        rows = shape_rows(frame, cfg)
        plans = rows[rows["kind"] == "plan"]
        if plans.empty:
            raise SearchError(f"{source} holds no kind=plan records for {cfg.shape_text} {cfg.dtype}; "
                              "replay a sweep of that shape")
        gpus = sorted(set(rows["gpu_name"].dropna().astype(str)))
        if len(gpus) > 1:
            raise SearchError(f"{source} mixes measurements of {len(gpus)} GPUs ({', '.join(gpus)}) for "
                              f"{cfg.shape_text}; latencies of different GPUs do not mix: replay one GPU's sweep")
        self.plans = {int(k): v for k, v in _outcomes(plans, _plan_keys(plans)).items()}
        segments = rows[rows["kind"] == "segment"]
        self.segments = _outcomes(segments, _segment_keys(segments))
        base = rows[(rows["kind"] == "baseline") & (rows["status"] == "ok")].dropna(subset=["latency_us"])
        self._baselines = {str(n): float(v) for n, v in base.groupby("baseline")["latency_us"].median().items()}

    @classmethod
    def from_file(cls, path: "str | Path", batch: int, seq_len: int, dtype: str | None = None) -> "ReplayMeasurer":
        """Replay the sweep of shape batch×seq_len held in a records file."""
        frame = load_records(path)
        cfg = config_from_records(frame, batch, seq_len, dtype, source=f"replay file {path}")
        return cls(frame, cfg, source=f"replay file {path}")

    def candidates(self) -> np.ndarray:
        return np.array(sorted(self.plans), dtype=np.int64)

    def measure(self, masks: Sequence[int]) -> list[tuple[str, float | None]]:
        out = []
        for mask in masks:
            if int(mask) not in self.plans:
                raise SearchError(f"{self.source} has no record of plan {mask} for {self.cfg.shape_text}; "
                                  "a replay can only answer plans its sweep measured")
            out.append(self.plans[int(mask)])
        return out

    def measure_segments(self, segments: Sequence[Segment]) -> list[tuple[str, float | None]]:
        missing = [s.name for s in segments if s not in self.segments]
        if missing:
            raise SearchError(f"{self.source} has no kind=segment record of {', '.join(missing[:4])}"
                              f"{' …' if len(missing) > 4 else ''} for {self.cfg.shape_text}; segment-dp needs "
                              "every segment kernel measured alone; use another strategy or a sweep with segments")
        return [self.segments[s] for s in segments]

    def baselines(self) -> dict[str, float]:
        return dict(self._baselines)


class GpuMeasurer(Measurer):
    """Measures on the local GPUs through fusionsearch.bench, appending every record to records_path.

    One worker pool lives as long as the measurer (close() it, or use it as a context manager): spawning workers
    per batch would re-initialise CUDA each time. With resume, keys the records file already holds a final
    result for (same GPU, templates and shape) are answered from it, as bench does.
    """

    def __init__(self, cfg: LayerConfig, records_path: "str | Path", *, gpus=None, resume: bool = True,
                 **bench_options) -> None:
        self.cfg = cfg
        self.records_path = Path(records_path)
        self.options = {"resume": resume, "progress": False, **bench_options}
        self.gpus = gpus
        self._pool = None

    @staticmethod
    def _bench():
        from .. import bench  # imported lazily: bench pulls in torch and CUDA

        return bench

    @property
    def pool(self):
        if self._pool is None:
            from ..worker import WorkerPool

            self._pool = WorkerPool(self._bench().cuda_devices(self.gpus))
        return self._pool

    def environment(self) -> dict:
        """gpu / torch / cuda / template_hash as the workers see them (what records are matched on)."""
        return self.pool.environments()[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "GpuMeasurer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def measure(self, masks: Sequence[int]) -> list[tuple[str, float | None]]:
        plans = [decode(int(m)) for m in masks]
        found = self._bench().measure_plans(self.cfg, plans, self.records_path, pool=self.pool, **self.options)
        return [_outcome(r) for r in found]

    def measure_segments(self, segments: Sequence[Segment]) -> list[tuple[str, float | None]]:
        found = self._bench().run_sweep(self.cfg, list(segments), self.records_path, pool=self.pool, **self.options)
        return [_outcome(r) for r in found]

    def baselines(self) -> dict[str, float]:
        found = self._bench().measure_baselines(self.cfg, None, self.records_path, pool=self.pool, **self.options)
        return {str(r["baseline"]): latency for r in found if r
                for status, latency in [_outcome(r)] if status == "ok"}


def _outcome(record: dict | None) -> tuple[str, float | None]:
    """(status, median µs) of one bench record; a missing record reads as a runtime error."""
    if record is None:
        return "runtime_error", None
    latency = record.get("latency_us")
    if isinstance(latency, dict):
        latency = latency.get("median")
    status = str(record.get("status", "runtime_error"))
    return status, (float(latency) if status == "ok" and latency is not None else None)
