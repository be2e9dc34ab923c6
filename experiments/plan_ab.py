"""Whole plans and each of their kernels alone, from plan-only libraries, after a check against fp32.

    PYTHONPATH=. python experiments/plan_ab.py --tag base --out F.json [--dtypes fp16] \
        [--cases 64x512:48932 16x128:48996] [--build-only]

One side of an A/B between two kernel trees (experiments/kernel_ab.py runs both): the libraries hold only the
plans' segments, so a tree builds in about a minute instead of the full library's three. Timings are CUDA events
over graph replays (fusionsearch.timing) on fixed inputs; the two trees are timed in alternation, so what the L2
keeps between replays is the same for both.
"""
from __future__ import annotations

import argparse
import json
import math

DEFAULT_CASES = ["64x512:48932", "16x512:48932", "64x128:48932", "16x128:48996", "8x128:48996", "16x1024:48932"]


def parse_case(text: str) -> tuple[str, int]:
    shape, _, mask = text.partition(":")
    if not mask.isdigit():
        raise argparse.ArgumentTypeError(f"case {text!r} is not SHAPE:MASK; write e.g. 64x512:48932")
    return shape, int(mask)


def run_case(shape: str, mask: int, dtype: str) -> dict:
    import torch

    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.mask import decode
    from fusionsearch.runtime import FusedEncoderLayer, KernelLibrary, key_bias
    from fusionsearch.timing import time_cuda_graph
    from fusionsearch.verify import random_inputs, verify_plan
    from fusionsearch.weights import LayerWeights, torch_dtype

    plan = decode(mask)
    batch, seq = parse_shape(shape)
    cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
    library = KernelLibrary.get(cfg, plan.segments)
    weights = LayerWeights.random(cfg, seed=0, device="cuda")
    layer = FusedEncoderLayer(plan, weights, cfg, library=library)
    budget = verify_plan(layer, weights, cfg)
    x, attention_mask = random_inputs(cfg, seed=1)
    x = x.to(torch_dtype(dtype))
    tensors = layer.tensors_for(x, key_bias(attention_mask, cfg), torch.empty_like(x))
    scale = 1.0 / math.sqrt(cfg.head_size)

    def timed(kernel_ids: list[int]) -> dict:
        stats = time_cuda_graph(lambda: library.run(kernel_ids, tensors, batch, seq, cfg.eps, scale))
        return {k: stats[k] for k in ("median", "p20", "p80")}

    return {"shape": shape, "mask": mask, "dtype": dtype, "ok": budget.ok, "error": budget.candidate_error,
            "limit": budget.limit, "plan": timed(layer.kernel_ids),
            "segments": {seg.name: timed([library.index(seg)]) for seg in plan.segments}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="name of this tree in the output (e.g. base, variant)")
    parser.add_argument("--out", help="JSON list of rows, rewritten after every case")
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=["fp16", "bf16"])
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES])
    parser.add_argument("--build-only", action="store_true", help="build the plans' libraries and stop")
    args = parser.parse_args()
    if args.build_only:
        from fusionsearch.config import LayerConfig
        from fusionsearch.mask import decode
        from fusionsearch.runtime import KernelLibrary
        for dtype in args.dtypes:
            for mask in sorted({mask for _, mask in args.cases}):
                KernelLibrary.get(LayerConfig(dtype=dtype), decode(mask).segments)
        return 0
    rows = []
    for dtype in args.dtypes:
        for shape, mask in args.cases:
            row = {"tag": args.tag, **run_case(shape, mask, dtype)}
            rows.append(row)
            alone = " ".join(f"{name} {t['median']:.1f}" for name, t in row["segments"].items())
            print(f"{args.tag} {dtype} {shape} {mask}: ok={row['ok']} error {row['error']:.2e}; plan "
                  f"{row['plan']['median']:.1f} µs ({row['plan']['p20']:.1f}–{row['plan']['p80']:.1f}); alone: {alone}",
                  flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
