"""Run one segment kernel, or every kernel of a plan, a few times, for a profiler to attach to.

    ncu --clock-control none -k regex:seg_10_11 -c 1 \
        python experiments/profile_segment.py --shape 64x512 --segment 10-11 [--attention] [--dtype fp16]
    ncu --clock-control none -k 'regex:fs_seg|device_kernel|wgmma_attention|nvjet' -c 7 \
        python experiments/profile_segment.py --shape 64x512 --plan 48934

With --segment the plan cuts at every operator boundary outside the segment, so the other kernels only fill its
inputs. Kernels come from the library of every segment (the one sweeps and reports build), so a warm cache costs
no build. Kernel names: fs_seg_AA_BB (generated), cutlass device_kernel (Hopper GEMM segments),
wgmma_attention_kernel (the attention segment alone on sm_90 from 128 keys), nvjet/sm90 (cuBLAS).
"""
from __future__ import annotations

import argparse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x512")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--segment", help="first-last operator, e.g. 10-11")
    which.add_argument("--plan", type=int, help="a plan's mask: run all of its kernels")
    parser.add_argument("--attention", action="store_true", help="the segment holds the flash-attention stage")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch

    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.mask import decode
    from fusionsearch.plan import Plan
    from fusionsearch.runtime import FusedEncoderLayer, KernelLibrary
    from fusionsearch.verify import random_inputs
    from fusionsearch.weights import LayerWeights, torch_dtype

    if args.plan is not None:
        plan = decode(args.plan)
    else:
        first, last = (int(v) for v in args.segment.split("-"))
        plan = Plan.from_cuts(set(range(1, 15)) - set(range(first + 1, last + 1)), attention=args.attention)
    batch, seq = parse_shape(args.shape)
    cfg = LayerConfig(batch=batch, seq_len=seq, dtype=args.dtype)
    library = KernelLibrary.get(cfg)
    layer = FusedEncoderLayer(plan, LayerWeights.random(cfg, seed=0, device="cuda"), cfg, library=library)
    x, mask = random_inputs(cfg, seed=1)
    x = x.to(torch_dtype(args.dtype))
    out = torch.empty_like(x)
    for _ in range(args.runs):
        layer.run_into(x, mask, out)
    torch.cuda.synchronize()
    print(f"ran {plan.describe()} {args.runs}× at {args.shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
