"""Every form of the attention segment checked alone against fp32, at ragged, short and long sequence lengths.

    PYTHONPATH=. python experiments/check_attention.py [--dtypes fp16 bf16]

The forms: with or without the QKV split before it (operator 1, read from the QKV GEMM's rows), with or without
merged heads after it (operator 6), and after the QKV GEMM in one kernel. The shapes cross every kernel switch
of the lone segment (the few-item kernel at B·S ≤ 8×128, one and several key tiles, S past a tile boundary); the
last three have more items (64 query rows of one head) than an H100 holds warpgroup-kernel blocks at once, on 64-
and 128-key tiles, with padded tails skipped at 1000 keys.
Exit status 1 if any check is out of budget.
"""
from __future__ import annotations

import argparse

SHAPES = [(2, 255), (2, 256), (2, 129), (3, 300), (1, 1024), (4, 512), (2, 128), (1, 64), (5, 100), (64, 128), (1, 7),
          (24, 200), (16, 300), (6, 1000)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    args = parser.parse_args()

    from fusionsearch.config import LayerConfig
    from fusionsearch.plan import Segment
    from fusionsearch.runtime import KernelLibrary
    from fusionsearch.verify import verify_segment
    from fusionsearch.weights import LayerWeights

    forms = (Segment(2, 5, True), Segment(1, 5, True), Segment(2, 6, True), Segment(1, 6, True), Segment(0, 6, True))
    failed = checked = 0
    for dtype in args.dtypes:
        library = KernelLibrary.get(LayerConfig(dtype=dtype), forms)
        for batch, seq in SHAPES:
            cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
            weights = LayerWeights.random(cfg, seed=3, device="cuda")
            for segment in forms:
                result = verify_segment(library, segment, weights, cfg, seed=batch + seq)
                checked += 1
                failed += not result.ok
                if not result.ok:
                    print(f"FAIL {dtype} {batch}x{seq} {segment.name}: error {result.candidate_error:.2e} against "
                          f"{result.limit:.2e}: {result.reason}", flush=True)
    print(f"check_attention: {checked - failed} of {checked} checks within budget")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
