"""Quick latency probe: a few named plans against PyTorch baselines at the design shapes (fp16, BERT-base).

    PYTHONPATH=. python experiments/perf_probe.py [--shapes 1x32 16x128] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = ["1x32", "1x128", "8x128", "16x128", "16x512", "64x128", "64x512"]


def named_plans():
    from fusionsearch.plan import Plan
    return {
        "unfused": Plan.from_cuts(set(range(1, 15))),
        "bytetransformer": Plan.from_cuts({1, 7, 8, 10, 12, 13}, attention=True),
        "fastertransformer": Plan.from_cuts({1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13}),
        "epilogues+attn": Plan.from_cuts({2, 7, 9, 10, 12, 14}, attention=True),
        "5-kernel attn": Plan.from_cuts({2, 7, 10, 12}, attention=True),
        "one kernel attn": Plan.from_cuts(set(), attention=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--baselines", nargs="+", default=["eager_graph", "sdpa_graph", "nn_fastpath"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from fusionsearch import baselines
    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.runtime import FusedEncoderLayer, KernelLibrary
    from fusionsearch.timing import time_cuda_graph, time_eager
    from fusionsearch.verify import random_inputs, verify_plan
    from fusionsearch.weights import LayerWeights

    results = {}
    library = KernelLibrary.get(LayerConfig())
    weights = LayerWeights.random(LayerConfig(), seed=0)
    for shape in args.shapes:
        batch, seq = parse_shape(shape)
        cfg = LayerConfig(batch=batch, seq_len=seq)
        x, mask = random_inputs(cfg, seed=1)
        x = x.half()
        row = {}
        for name, plan in named_plans().items():
            layer = FusedEncoderLayer(plan, weights, cfg, library=library)
            budget = verify_plan(layer, weights, cfg, seed=2)
            stats = time_cuda_graph(lambda: layer(x, mask))
            row[name] = {"median": stats["median"], "p20": stats["p20"], "p80": stats["p80"], "ok": budget.ok,
                         "mask": plan.mask}
        inputs = baselines.Inputs(x, mask)
        weights_low = weights.to(device="cuda", dtype=torch.float16)
        for name in args.baselines:
            built = baselines.build(name, cfg, weights_low, inputs)
            built.run()
            timer = time_cuda_graph if built.graph else time_eager
            stats = timer(built.target())
            row[name] = {"median": stats["median"], "p20": stats["p20"], "p80": stats["p80"]}
        results[shape] = row
        print(shape, "  ".join(f"{k}={v['median']:.1f}{'' if v.get('ok', True) else '(WRONG)'}"
                               for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
