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


class PreparedPlan:
    """One plan at one shape, built from this tree and checked against fp32 (`budget`), with fixed inputs in
    `tensors`; run(kernel_ids) launches some of its kernels on them."""

    def __init__(self, shape: str, mask: int, dtype: str):
        import torch

        from fusionsearch.config import LayerConfig, parse_shape
        from fusionsearch.mask import decode
        from fusionsearch.runtime import FusedEncoderLayer, KernelLibrary, key_bias
        from fusionsearch.verify import random_inputs, verify_plan
        from fusionsearch.weights import LayerWeights, torch_dtype

        self.plan = decode(mask)
        batch, seq = parse_shape(shape)
        self.cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
        self.library = KernelLibrary.get(self.cfg, self.plan.segments)
        weights = LayerWeights.random(self.cfg, seed=0, device="cuda")
        self.layer = FusedEncoderLayer(self.plan, weights, self.cfg, library=self.library)
        self.budget = verify_plan(self.layer, weights, self.cfg)
        x, attention_mask = random_inputs(self.cfg, seed=1)
        x = x.to(torch_dtype(dtype))
        self.tensors = self.layer.tensors_for(x, key_bias(attention_mask), torch.empty_like(x))

    def run(self, kernel_ids: list[int]) -> None:
        cfg = self.cfg
        self.library.run(kernel_ids, self.tensors, cfg.batch, cfg.seq_len, cfg.eps, 1.0 / math.sqrt(cfg.head_size))


def run_case(shape: str, mask: int, dtype: str) -> dict:
    from fusionsearch.timing import time_cuda_graph

    case = PreparedPlan(shape, mask, dtype)

    def timed(kernel_ids: list[int]) -> dict:
        stats = time_cuda_graph(lambda: case.run(kernel_ids))
        return {k: stats[k] for k in ("median", "p20", "p80")}

    budget = case.budget
    return {"shape": shape, "mask": mask, "dtype": dtype, "ok": budget.ok, "error": budget.candidate_error,
            "limit": budget.limit, "plan": timed(case.layer.kernel_ids),
            "segments": {seg.name: timed([case.library.index(seg)]) for seg in case.plan.segments}}


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
