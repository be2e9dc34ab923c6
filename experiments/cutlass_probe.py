"""CUTLASS 3.x Hopper GEMMs with fused epilogues against cuBLAS on the four BERT-base GEMMs, same process.

    PYTHONPATH=. python experiments/cutlass_probe.py [--rows 2048 32768] [--out F.json]

Needs the pinned CUTLASS headers (`pip install 'fusionsearch[cutlass]'`, i.e. nvidia-cutlass) and an sm_90 GPU.
Builds experiments/cutlass_probe/gemm_epilogue.cu (128×256×64 tiles, 2×1 cluster, TMA + warpgroup MMA,
warp-specialized cooperative schedule) through torch.utils.cpp_extension.load and reports the build time. Per
GEMM and row count: cuBLAS (F.linear) against CUTLASS y = x·Wᵀ, and the epilogue the layer would fuse there,
against cuBLAS plus the separate PyTorch op:
  FFN1: GELU(x·Wᵀ + b) against F.linear(x, W, b) then GELU;
  attention output and FFN2: x·Wᵀ + b + residual against F.linear(x, W, b) + residual.
Every output is checked against an fp32 reference (into NaN-poisoned memory) before it is timed; timings are CUDA
events over graph replays with the L2 flushed before each sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusionsearch.reference import relative_error as rel_error  # noqa: E402  (NaN from a skipped row stays NaN)
from fusionsearch.timing import time_cuda_graph  # noqa: E402

HERE = Path(__file__).resolve().parent / "cutlass_probe"
# name: (N, K, fused epilogue) of y[M, N] = x[M, K]·W[N, K]ᵀ in a BERT-base layer
GEMMS = {"qkv": (2304, 768, None), "attn_out": (768, 768, "bias_residual"), "ffn1": (3072, 768, "bias_gelu"),
         "ffn2": (768, 3072, "bias_residual")}


def cutlass_include_dirs() -> list[str]:
    """Header folders of the nvidia-cutlass wheel (cute/, cutlass/ and the util headers)."""
    try:
        import cutlass_library
    except ImportError as error:
        raise SystemExit("cutlass_probe: the CUTLASS headers are missing; pip install 'fusionsearch[cutlass]' "
                         "(nvidia-cutlass)") from error
    source = Path(cutlass_library.__file__).resolve().parent / "source"
    return [str(source / "include"), str(source / "tools" / "util" / "include")]


def build(cache: Path):
    from torch.utils.cpp_extension import load

    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = load(name="fs_cutlass_probe", sources=[str(HERE / "gemm_epilogue.cu")], build_directory=str(cache),
                  extra_include_paths=[str(HERE), *cutlass_include_dirs()],
                  extra_cuda_cflags=["-std=c++17", "-O3", "--expt-relaxed-constexpr",
                                     "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
    return module, time.perf_counter() - start


def poisoned(fn, shape):
    """Run fn after filling the block the allocator will hand out next with NaN, so rows it skips show up."""
    torch.full(shape, float("nan"), dtype=torch.float16, device="cuda")  # freed at once, reused by fn's output
    return fn()


def stats(fn, flops: float) -> dict:
    result = time_cuda_graph(fn, flush_l2=True)
    result["tflops"] = flops / (result["median"] * 1e-6) / 1e12
    return result


def measure(module, rows: int, name: str, seed: int = 0) -> dict:
    n, k, epilogue = GEMMS[name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, generator=gen, device="cuda").half()
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).half()
    b = torch.randn(n, generator=gen, device="cuda").half()
    r = torch.randn(rows, n, generator=gen, device="cuda").half()
    flops = 2.0 * rows * n * k
    exact = x.float() @ w.float().T
    row = {"gemm": name, "M": rows, "N": n, "K": k, "flops": flops}
    row["cutlass_err"] = rel_error(poisoned(lambda: module.linear(x, w), (rows, n)), exact)
    row["cublas_err"] = rel_error(F.linear(x, w), exact)
    row["cublas"] = stats(lambda: F.linear(x, w), flops)
    row["cutlass"] = stats(lambda: module.linear(x, w), flops)
    if epilogue == "bias_gelu":
        ref = F.gelu(exact + b.float())
        fused, separate = (lambda: module.linear_bias_gelu(x, w, b)), (lambda: F.gelu(F.linear(x, w, b)))
    elif epilogue == "bias_residual":
        ref = exact + b.float() + r.float()
        fused, separate = (lambda: module.linear_bias_residual(x, w, b, r)), (lambda: F.linear(x, w, b) + r)
    else:
        return row
    row["epilogue"] = epilogue
    row["cutlass_fused_err"] = rel_error(poisoned(fused, (rows, n)), ref)
    row["cublas_separate_err"] = rel_error(separate(), ref)
    row["cublas_separate"] = stats(separate, flops)
    row["cutlass_fused"] = stats(fused, flops)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[2048, 32768], help="M = batch × sequence length")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FUSIONSEARCH_CACHE_DIR", ".fscache")) /
                        "cutlass_probe")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("cutlass_probe: needs an sm_90 GPU (H100/H200); the kernels use Hopper TMA and wgmma")
    module, build_s = build(args.cache)
    print(f"built in {build_s:.1f} s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build_s": build_s, "rows": []}
    for rows in args.rows:
        for name in GEMMS:
            row = measure(module, rows, name)
            result["rows"].append(row)
            line = (f"M={rows} {name}: cuBLAS {row['cublas']['median']:.1f} µs ({row['cublas']['tflops']:.0f} "
                    f"TFLOP/s), CUTLASS {row['cutlass']['median']:.1f} µs ({row['cutlass']['tflops']:.0f}), "
                    f"err {row['cutlass_err']:.1e}/{row['cublas_err']:.1e}")
            if "epilogue" in row:
                line += (f"; {row['epilogue']}: cuBLAS + op {row['cublas_separate']['median']:.1f} µs, CUTLASS "
                         f"fused {row['cutlass_fused']['median']:.1f} µs, err {row['cutlass_fused_err']:.1e}/"
                         f"{row['cublas_separate_err']:.1e}")
            print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
