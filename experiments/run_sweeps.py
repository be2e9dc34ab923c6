"""Sweep shapes on the GPU: plans (all canonical, or a seeded sample), every segment alone, PyTorch baselines
and the measured ceilings, appended to one records file per shape.

    PYTHONPATH=. python experiments/run_sweeps.py --out DIR --shapes 1x32 1x128 [--sample N] [--baselines ...]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DEFAULT_BASELINES = ["eager", "eager_graph", "sdpa_graph", "nn_fastpath", "compile", "compile_graph", "hf_bert_graph"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", required=True)
    parser.add_argument("--sample", type=int, default=0, help="measure N random canonical plans (0: all 18,432)")
    parser.add_argument("--baselines", nargs="*", default=DEFAULT_BASELINES)
    parser.add_argument("--dtype", default="fp16")
    args = parser.parse_args()
    from fusionsearch import baselines
    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.plan import enumerate_plans, hand_fused_plans
    from fusionsearch.sweep import sweep_shape

    args.out.mkdir(parents=True, exist_ok=True)
    ceilings = baselines.measure_ceilings(args.dtype)
    (args.out / "ceilings.json").write_text(json.dumps(ceilings))
    print("ceilings", ceilings, flush=True)
    for shape in args.shapes:
        batch, seq = parse_shape(shape)
        cfg = LayerConfig(batch=batch, seq_len=seq, dtype=args.dtype)
        path = args.out / f"sweep-{shape}-{args.dtype}.jsonl"
        plans = list(enumerate_plans())
        if args.sample:
            plans = random.Random(f"{shape}-{args.sample}").sample(plans, args.sample)
        plans = list(hand_fused_plans().values()) + plans  # always measured, to compare against
        done = sweep_shape(cfg, path, plans=plans, baselines=args.baselines, progress=False)
        found = [r for r in done.found if r["kind"] == "baseline"]
        print(shape, "plans", done.plan_counts, f"{done.plan_seconds:.0f} s", "segments", done.segment_counts,
              "baselines", {r.get("baseline"): (r["latency_us"] or {}).get("median") for r in found}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
