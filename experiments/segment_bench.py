"""Each kernel of a plan timed alone, beside the whole plan and SM copies of the same sizes, in one process.

    PYTHONPATH=. python experiments/segment_bench.py [--shapes 16x128 64x512] [--plan 48934] [--dtype fp16] \
        [--out F.json]

The plan is checked against the fp32 reference first (poisoned buffers). Timings are the sweeps' (sweep's rig:
CUDA events over graph replays, weights and inputs rotated past the L2), so they compare with the sweep records.
Per segment: median µs (p20–p80), the bytes it must move across its boundary (each tensor once), the rate that
implies, and the TFLOP/s of its GEMMs. The copies are elementwise kernels over [B·S, hidden] tensors: one read +
one write (a LayerNorm alone) and two reads + one write (bias + residual + LayerNorm).

With --hold SECONDS each kernel (and the whole plan) is also replayed back to back for that long while nvidia-smi
reads the SM clock and power (`clock_hold.py`): a kernel slower than its tensor-core work suggests may be
issue-bound or held to a lower clock by the power limit, and only a steady hold tells which.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clock_hold import hold  # noqa: E402
from summarize_sweeps import SHAPE_ORDER  # noqa: E402


def copy_rates(cfg) -> dict:
    """µs of torch.mul (read 1, write 1) and torch.add (read 2, write 1) over [B·S, hidden] tensors."""
    import torch

    from fusionsearch.timing import time_cuda_graph
    from fusionsearch.weights import torch_dtype

    rows = cfg.batch * cfg.seq_len
    x, y, out = (torch.randn(rows, cfg.hidden, device="cuda").to(torch_dtype(cfg.dtype)) for _ in range(3))
    mul = time_cuda_graph(lambda: torch.mul(x, 1.0, out=out))
    add = time_cuda_graph(lambda: torch.add(x, y, out=out))
    return {"read1_write1_us": mul["median"], "read2_write1_us": add["median"], "tensor_bytes": x.nbytes}


def bench_shape(shape: str, plan, dtype: str, hold_s: float = 0.0) -> dict:
    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.features import segment_table
    from fusionsearch.sweep import _Rig

    batch, seq = parse_shape(shape)
    cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
    rig = _Rig(cfg, seed=0, first=plan)  # the library of every segment: the sweeps' and reports' build cache
    budget = rig.check()
    if not budget.ok:
        raise SystemExit(f"{shape}: plan {plan.mask} failed its check against fp32: {budget.reason}")
    facts = segment_table(cfg)
    whole = rig.time(rig.launchers())
    segments = []
    for seg in plan.segments:
        calls = rig.launchers([rig.library.index(seg)])
        stats = rig.time(calls)
        moved, flops = facts[seg]["boundary_bytes"], facts[seg]["gemm_flops"]
        us = stats["median"]
        segments.append({"segment": seg.name, "ops": list(seg.ops), "us": us, "p20": stats["p20"], "p80": stats["p80"],
                         "boundary_bytes": moved, "tbs": moved / (us * 1e-6) / 1e12,
                         "gemm_tflops": flops / (us * 1e-6) / 1e12 if flops else None})
        if hold_s:
            segments[-1]["hold"] = hold(calls, hold_s)
    row = {"shape": shape, "mask": plan.mask, "dtype": dtype, "error": budget.candidate_error,
           "plan_us": whole["median"], "plan_p20": whole["p20"], "plan_p80": whole["p80"],
           "segments_sum_us": sum(s["us"] for s in segments), "segments": segments, "copies": copy_rates(cfg)}
    if hold_s:
        row["plan_hold"] = hold(rig.launchers(), hold_s)
    return row


def hold_text(h: dict | None) -> str:
    if not h:
        return ""
    if h["sm_mhz"] is None:  # nvidia-smi gave no readable sample
        return f"  held: {h['us_per_call']:.1f} µs (no clock samples)"
    return (f"  held: {h['us_per_call']:.1f} µs at {h['sm_mhz']:.0f} MHz (min {h['sm_mhz_min']:.0f}), "
            f"{h['power_w']:.0f} W, reasons {h['event_reasons']}")


def print_shape(row: dict) -> None:
    print(f"\n{row['shape']} plan {row['mask']} ({row['dtype']}): {row['plan_us']:.1f} µs "
          f"({row['plan_p20']:.1f}–{row['plan_p80']:.1f}); kernels alone sum to {row['segments_sum_us']:.1f} µs; "
          f"error vs fp32 {row['error']:.2e}{hold_text(row.get('plan_hold'))}")
    copies = row["copies"]
    tensor = copies["tensor_bytes"]
    print(f"  SM copies of [B·S, hidden]: read 1 + write 1 {copies['read1_write1_us']:.1f} µs "
          f"({2 * tensor / copies['read1_write1_us'] / 1e6:.2f} TB/s), read 2 + write 1 "
          f"{copies['read2_write1_us']:.1f} µs ({3 * tensor / copies['read2_write1_us'] / 1e6:.2f} TB/s)")
    for s in row["segments"]:
        gemm = f", GEMMs {s['gemm_tflops']:.0f} TFLOP/s" if s["gemm_tflops"] else ""
        print(f"  {s['segment']:<16} {s['us']:8.1f} µs ({s['p20']:.1f}–{s['p80']:.1f})  "
              f"{s['boundary_bytes'] / 1e6:7.1f} MB at {s['tbs']:.2f} TB/s{gemm}{hold_text(s.get('hold'))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPE_ORDER)
    parser.add_argument("--plan", type=int, default=48934, help="plan mask (default: the large-shape winner)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                        help="also replay each kernel this long and read the SM clock and power (0: off)")
    args = parser.parse_args()
    if args.hold and shutil.which("nvidia-smi") is None:
        parser.error("--hold reads the clock and power with nvidia-smi, which is not on PATH; add the driver's "
                     "utilities to PATH or leave --hold out")
    from fusionsearch.mask import decode

    plan = decode(args.plan)
    rows = []
    for shape in args.shapes:
        rows.append(bench_shape(shape, plan, args.dtype, args.hold))
        print_shape(rows[-1])
        if args.out:  # after every shape, so a cut run keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
