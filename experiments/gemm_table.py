"""The four BERT GEMMs from recorded sweeps: cuBLAS (lone GEMM segment) against the generated tensor-core GEMM
with its epilogue (the two-operator segment), in µs and TFLOP/s.

    PYTHONPATH=. python experiments/gemm_table.py experiments/data/sweeps > experiments/results/gemm-vs-cublas-h100.md
"""
from __future__ import annotations

import sys
from pathlib import Path

SHAPES = ["1x32", "1x128", "8x128", "16x128", "16x512", "64x128", "64x512"]
GEMMS = ((0, 1), (7, 8), (10, 11), (12, 13))


def main() -> int:
    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.ops import OPS
    from fusionsearch.records import load_frame

    folder = Path(sys.argv[1])
    print("# BERT GEMMs on the H100: cuBLAS against the generated tensor-core GEMM (fp16)\n")
    print("Segment kernels timed alone in the sweeps (`experiments/data/sweeps/`, CUDA graphs, rotated inputs). "
          "'generated' is the GEMM fused with the operator after it (bias+split, bias+residual, bias+GELU, "
          "bias+residual), so it also does that epilogue's work.\n")
    print("| B×S | M | GEMM | cuBLAS µs | cuBLAS TFLOP/s | generated µs | generated TFLOP/s | generated / cuBLAS |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        path = folder / f"sweep-{shape}-fp16.jsonl.gz"
        if not path.exists():
            continue
        frame = load_frame(path)
        seg = frame[(frame["kind"] == "segment") & (frame["status"] == "ok")].set_index("key")["latency_us"]
        batch, seq = parse_shape(shape)
        cfg = LayerConfig(batch=batch, seq_len=seq)
        for op, nxt in GEMMS:
            flops = OPS[op].flops(cfg)
            alone, fused = seg[f"segment:seg_{op:02d}_{op:02d}"], seg[f"segment:seg_{op:02d}_{nxt:02d}"]
            print(f"| {shape} | {cfg.tokens} | {OPS[op].name} | {alone:.1f} | {flops / alone / 1e6:.0f} | "
                  f"{fused:.1f} | {flops / fused / 1e6:.0f} | {fused / alone:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
