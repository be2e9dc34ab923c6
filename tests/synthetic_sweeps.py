"""SYNTHETIC exhaustive sweeps for tests: latencies from an analytic function of the plan features, plus noise.

Nothing here is a measurement. The records say so in `gpu.name` and `template_hash` ("synthetic"), and
experiments/evaluate_search.py prints a warning when it reads them. The latency function has the trade-offs the
real hardware has (DESIGN §5–6), so that the best plan depends on the shape: fusing saves bytes and per-kernel
overhead, but GEMMs inside persistent cooperative kernels (any grid barrier) run less efficiently and barriers cost.
Plan latency is the sum of its kernels' latencies times a plan-specific factor (kernels interact through L2), so a
dynamic program over separately measured segments is close to, but not exactly, the truth.

Run `python tests/synthetic_sweeps.py` to regenerate tests/fixtures/ (small subsets of plans, committed).
"""
from __future__ import annotations

import gzip
import json
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionsearch.config import LayerConfig  # noqa: E402
from fusionsearch.features import all_canonical_masks, segment_incidence, segment_table  # noqa: E402
from fusionsearch.mask import decode  # noqa: E402
from fusionsearch.plan import all_segments  # noqa: E402

SYNTHETIC_GPU = "SYNTHETIC analytic model (not a measurement)"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_SHAPES = ((1, 128), (8, 128), (64, 512))
FIXTURE_PLANS = 1200  # per shape: a subset keeps the committed files small; tests may generate full sweeps
BASELINES = {"eager": 1.9, "sdpa_graph": 1.35, "compile_graph": 1.25}  # × the plan optimum, synthetic


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def segment_latency_us(cfg: LayerConfig) -> dict:
    """Noise-free synthetic latency of every segment kernel alone (None: the kernel 'fails to compile')."""
    peak, bandwidth = 767e6 * 0.8, 3.0e6 * 0.7  # FLOP/µs and B/µs actually reached
    out = {}
    for seg, facts in segment_table(cfg).items():
        if facts["gemms"] >= 4:
            out[seg] = None  # persistent kernels with ≥ 4 GEMM stages exceed shared memory: a compile error
            continue
        efficiency = 0.55 if facts["barriers"] else 1.0
        if seg.attention:
            efficiency *= 0.8
        compute = facts["flops"] / (peak * efficiency)
        # Small GEMMs are latency-bound: every GEMM stage costs at least ~6 µs.
        compute = max(compute, 6.0 * facts["gemms"])
        memory = (facts["boundary_bytes"] + 0.5 * facts["barrier_bytes"]) / bandwidth
        out[seg] = max(compute, memory) + 0.2 * min(compute, memory) + 2.5 + 1.1 * facts["barriers"]
    return out


def plan_latencies(masks: np.ndarray, cfg: LayerConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(latency µs or nan, status) per canonical mask; failures where a kernel fails plus ~1.2 % at random."""
    masks = np.asarray(masks, dtype=np.int64)
    seg_lat = segment_latency_us(cfg)
    per_segment = np.array([np.inf if seg_lat[s] is None else seg_lat[s] for s in all_segments()])
    total = segment_incidence(masks) @ np.where(np.isinf(per_segment), 0.0, per_segment)
    broken = segment_incidence(masks) @ np.isinf(per_segment)
    # Noise is drawn for all 65,536 mask values at once so a plan's latency does not depend on the subset.
    rng = np.random.default_rng(_seed("plans", seed, cfg.batch, cfg.seq_len, cfg.dtype))
    interaction, measurement, fail = rng.normal(0, 0.04, 1 << 16), rng.normal(0, 0.01, 1 << 16), rng.random(1 << 16)
    lat = total * np.exp(interaction[masks] + measurement[masks])
    status = np.full(len(masks), "ok", dtype=object)
    status[fail[masks] < 0.012] = "wrong_answer"
    status[fail[masks] < 0.006] = "timeout"
    status[broken > 0] = "compile_error"
    lat[status != "ok"] = np.nan
    return lat, status


def _record(kind: str, status: str, key: str, cfg: LayerConfig, latency: float | None, **fields) -> dict:
    stats = None
    if latency is not None:
        stats = {"median": round(latency, 4), "p20": round(latency * 0.99, 4), "p80": round(latency * 1.01, 4),
                 "mean": round(latency, 4), "min": round(latency * 0.98, 4), "max": round(latency * 1.05, 4),
                 "repeats": 50}
    record = {"schema": 1, "kind": kind, "status": status, "key": key, "mask": None, "canonical_id": None,
              "attention": None, "segments": None, "baseline": None,
              "batch": cfg.batch, "seq_len": cfg.seq_len, "heads": cfg.heads, "head_size": cfg.head_size,
              "ffn": cfg.ffn, "dtype": cfg.dtype, "latency_us": stats, "error": None,
              "message": None if status == "ok" else f"synthetic {status}",
              "gpu": {"name": SYNTHETIC_GPU, "capability": "0.0", "sm_count": 0},
              "torch": "synthetic", "cuda": "synthetic", "template_hash": "synthetic",
              "time": "2000-01-01T00:00:00Z"}
    record.update(fields)
    return record


def sweep_records(cfg: LayerConfig, masks: np.ndarray | None = None, seed: int = 0,
                  segments: bool = True, baselines: bool = True) -> list[dict]:
    """Records of a synthetic sweep: plans (all canonical plans unless `masks`), segments alone, baselines."""
    masks = all_canonical_masks() if masks is None else np.asarray(masks)
    lat, status = plan_latencies(masks, cfg, seed)
    records = []
    for mask, value, state in zip(masks, lat, status):
        plan = decode(int(mask))
        records.append(_record("plan", state, f"plan:{plan.canonical_id}", cfg,
                               None if state != "ok" else float(value), mask=int(mask),
                               canonical_id=plan.canonical_id, attention=plan.attention,
                               segments=[[s.first, s.last, s.attention] for s in plan.segments]))
    if segments:
        for seg, value in segment_latency_us(cfg).items():
            noisy = None if value is None else value * float(
                np.exp(np.random.default_rng(_seed("segment", seed, cfg.batch, cfg.seq_len, seg.name)).normal(0, 0.02)))
            records.append(_record("segment", "ok" if value is not None else "compile_error", f"segment:{seg.name}",
                                   cfg, noisy, attention=seg.attention, segments=[[seg.first, seg.last, seg.attention]]))
    if baselines:
        best = np.nanmin(plan_latencies(all_canonical_masks(), cfg, seed)[0])
        for name, factor in BASELINES.items():
            records.append(_record("baseline", "ok", f"baseline:{name}", cfg, float(best * factor), baseline=name))
    return records


def write_sweep(path: Path, records: list[dict]) -> Path:
    """Write records as JSON lines; a .gz path is compressed with a fixed timestamp, so reruns give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as packed:
            packed.write(data)
    else:
        path.write_bytes(data)
    return path


def fixture_masks(cfg: LayerConfig, count: int = FIXTURE_PLANS, seed: int = 0) -> np.ndarray:
    """A random subset of the canonical plans (the search space of a replay is what the replay holds)."""
    rng = np.random.default_rng(_seed("subset", seed, cfg.batch, cfg.seq_len))
    return np.sort(rng.choice(all_canonical_masks(), size=count, replace=False))


def main() -> None:
    for batch, seq_len in FIXTURE_SHAPES:
        cfg = LayerConfig(batch, seq_len)
        path = FIXTURES / f"synthetic_sweep_{batch}x{seq_len}.jsonl.gz"
        write_sweep(path, sweep_records(cfg, fixture_masks(cfg)))
        print(f"wrote {path} (SYNTHETIC)")


if __name__ == "__main__":
    main()
