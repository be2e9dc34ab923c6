"""CUTLASS 3.x Hopper GEMMs with fused epilogues against cuBLAS on the four BERT-base GEMMs, same process.

    PYTHONPATH=. python experiments/cutlass_probe.py [--rows 2048 32768] [--configs NAME ...] [--out F.json]
    PYTHONPATH=. python experiments/cutlass_probe.py --render F.json ...   # tables of earlier runs, no GPU

Needs an sm_90 GPU (H100/H200).
Builds the GEMM of kernels/fs_gemm_sm90.cuh (what the layer's GEMM + epilogue segments run on Hopper) as one
unit per configuration in CONFIGS (tile, cluster, cooperative or pingpong schedule, persistent or stream-K
scheduler; TMA + warpgroup MMA in all) through torch.utils.cpp_extension.load, in parallel, and reports the build
time. Per GEMM and row count, and per variant (the plain GEMM; the epilogue the layer would fuse there):
  1. every configuration with CUTLASS's default raster order, the fastest kept;
  2. that configuration under each raster order and swizzle in OPTIONS, the fastest kept;
  3. against cuBLAS (F.linear), or for the fused variant cuBLAS plus the separate PyTorch op:
     FFN1: GELU(x·Wᵀ + b), with CUTLASS's erff or fs::gelu_erf_fast, against F.linear(x, W, b) then GELU;
     attention output and FFN2: x·Wᵀ + b + residual against F.linear(x, W, b) + residual.
Every CUTLASS output is checked against an fp32 reference (into NaN-poisoned memory) before it is timed; timings
are CUDA events over graph replays with the L2 flushed before each sample. The cuBLAS kernel's name (its tile
and schedule) is recorded from the profiler.
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
from fusionsearch.resources import cutlass_include_dirs, kernels_dir  # noqa: E402
from fusionsearch.timing import launched_kernels, time_cuda_graph  # noqa: E402

HERE = Path(__file__).resolve().parent / "cutlass_probe"
# name: (N, K, fused epilogues) of y[M, N] = x[M, K]·W[N, K]ᵀ in a BERT-base layer
GEMMS = {"qkv": (2304, 768, ()), "attn_out": (768, 768, ("bias_residual",)),
         "ffn1": (3072, 768, ("bias_gelu", "bias_gelu_fast", "bias_gelu_lean")), "ffn2": (768, 3072, ("bias_residual",))}
# probe::Epilogue. bias_gelu: CUTLASS's erff GELU; bias_gelu_fast: fs::gelu_erf_fast in CUTLASS's
# LinCombPerColBiasEltAct; bias_gelu_lean: the same GELU on acc + bias with no source tensor (what FFN1 runs).
EPILOGUE_CODE = {None: 0, "bias_gelu": 1, "bias_residual": 2, "bias_gelu_fast": 3, "bias_gelu_lean": 4}
# name: (tile M, N, K), (cluster M, N), schedule, tile scheduler[, epilogue tile M, N (default: CUTLASS's choice)]
CONFIGS = {
    "coop_128x256_c2x1": ((128, 256, 64), (2, 1), "Cooperative", "PersistentScheduler"),
    "coop_128x256_c1x2": ((128, 256, 64), (1, 2), "Cooperative", "PersistentScheduler"),
    "coop_256x128_c1x2": ((256, 128, 64), (1, 2), "Cooperative", "PersistentScheduler"),
    "coop_128x128_c2x1": ((128, 128, 64), (2, 1), "Cooperative", "PersistentScheduler"),
    "coop_128x256_c2x1_sk": ((128, 256, 64), (2, 1), "Cooperative", "StreamKScheduler"),
    "pp_128x128_c1x1": ((128, 128, 64), (1, 1), "Pingpong", "PersistentScheduler"),
    "pp_128x128_c2x1": ((128, 128, 64), (2, 1), "Pingpong", "PersistentScheduler"),
    "pp_128x128_c1x1_e64x64": ((128, 128, 64), (1, 1), "Pingpong", "PersistentScheduler", (64, 64)),
    "pp_64x256_c2x1": ((64, 256, 64), (2, 1), "Pingpong", "PersistentScheduler"),
    "pp_64x128_c1x1": ((64, 128, 64), (1, 1), "Pingpong", "PersistentScheduler"),
    # Tiles sized for one wave of 132 SMs at 1024-2048 rows (N = 3072: 192 columns; N = 768: 96 columns).
    "coop_128x192_c1x1": ((128, 192, 64), (1, 1), "Cooperative", "PersistentScheduler"),
    "coop_128x192_c2x1": ((128, 192, 64), (2, 1), "Cooperative", "PersistentScheduler"),
    "pp_64x192_c1x1": ((64, 192, 64), (1, 1), "Pingpong", "PersistentScheduler"),
    "coop_128x96_c1x1": ((128, 96, 64), (1, 1), "Cooperative", "PersistentScheduler"),
    "pp_64x96_c1x1": ((64, 96, 64), (1, 1), "Pingpong", "PersistentScheduler"),
    "coop_128x96_c1x1_sk": ((128, 96, 64), (1, 1), "Cooperative", "StreamKScheduler"),
    "coop_128x128_c1x1_sk": ((128, 128, 64), (1, 1), "Cooperative", "StreamKScheduler"),
    # Few rows (32-128): narrow tiles, or stream-K, spread the weight stream over the SMs.
    "pp_64x48_c1x1": ((64, 48, 64), (1, 1), "Pingpong", "PersistentScheduler"),
    "pp_64x64_c1x1": ((64, 64, 64), (1, 1), "Pingpong", "PersistentScheduler"),
    "coop_128x64_c1x1_sk": ((128, 64, 64), (1, 1), "Cooperative", "StreamKScheduler"),
}
# (raster, swizzle): raster 1 = along M, 2 = along N (probe::Options)
OPTIONS = [(r, s) for r in (1, 2) for s in (1, 2, 4, 8)]


def config_unit(name: str) -> str:
    """The source of one configuration unit: PROBE_DEFINE of run_<name> / workspace_<name>."""
    (tm, tn, tk), (cm, cn), schedule, scheduler, *epilogue_tile = CONFIGS[name]
    tile = "".join(f", cute::Shape<cute::_{em}, cute::_{en}>" for em, en in epilogue_tile)
    config = (f"fs::sm90::Config<cute::Shape<cute::_{tm}, cute::_{tn}, cute::_{tk}>, "
              f"cute::Shape<cute::_{cm}, cute::_{cn}, cute::_1>, fs::sm90::{schedule}, cutlass::gemm::{scheduler}{tile}>")
    return f'#include "gemm_epilogue.cuh"\nPROBE_DEFINE({name}, {config})\n'


def _write_if_changed(path: Path, text: str) -> None:
    """Leave unchanged files alone so ninja rebuilds only what changed."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_units(names: list[str], folder: Path) -> list[Path]:
    """The configuration units and configs.inc for the binding, under folder."""
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"cutlass_probe: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    folder.mkdir(parents=True, exist_ok=True)
    units = []
    for name in names:
        units.append(folder / f"{name}.cu")
        _write_if_changed(units[-1], config_unit(name))
    _write_if_changed(folder / "configs.inc", "".join(f"PROBE_CONFIG({name})\n" for name in names))
    return units


def build(cache: Path, names: list[str]):
    from torch.utils.cpp_extension import load

    units = write_units(names, cache / "units")
    start = time.perf_counter()
    module = load(name="fs_cutlass_probe", sources=[str(HERE / "gemm_epilogue.cu"), *map(str, units)],
                  build_directory=str(cache), extra_include_paths=[str(HERE), str(cache / "units"),
                                                                   str(kernels_dir()), *cutlass_include_dirs()],
                  extra_cuda_cflags=["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
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


class Problem:
    """Random operands of one BERT GEMM at `rows` rows, the fp32 references and the cuBLAS calls."""

    def __init__(self, name: str, rows: int, seed: int = 0):
        n, k, self.epilogues = GEMMS[name]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.x = torch.randn(rows, k, generator=gen, device="cuda").half()
        self.w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).half()
        self.b = torch.randn(n, generator=gen, device="cuda").half()
        self.r = torch.randn(rows, n, generator=gen, device="cuda").half()
        self.shape, self.flops = (rows, n), 2.0 * rows * n * k
        exact = self.x.float() @ self.w.float().T
        gelu = F.gelu(exact + self.b.float())
        self.reference = {None: exact, "bias_gelu": gelu, "bias_gelu_fast": gelu, "bias_gelu_lean": gelu,
                          "bias_residual": exact + self.b.float() + self.r.float()}

    def cublas(self, epilogue):
        x, w, b, r = self.x, self.w, self.b, self.r
        gelu = lambda: F.gelu(F.linear(x, w, b))  # noqa: E731
        return {None: lambda: F.linear(x, w), "bias_gelu": gelu, "bias_gelu_fast": gelu, "bias_gelu_lean": gelu,
                "bias_residual": lambda: F.linear(x, w, b) + r}[epilogue]

    def cutlass(self, module, config: str, epilogue, option=(0, 1)):
        args = (config, EPILOGUE_CODE[epilogue], self.x, self.w, self.b, self.r, *option)
        return lambda: module.gemm(*args)


def best_cutlass(module, problem: Problem, epilogue, configs: list[str]) -> dict:
    """Steps 1 and 2 of the module docstring for one variant; every timed call was checked first."""
    tried = {}
    for config in configs:
        fn = problem.cutlass(module, config, epilogue)
        tried[config] = {"err": rel_error(poisoned(fn, problem.shape), problem.reference[epilogue]),
                         **stats(fn, problem.flops)}
    config = min(tried, key=lambda c: tried[c]["median"])
    options = {}
    for option in OPTIONS:
        fn = problem.cutlass(module, config, epilogue, option)
        options[f"raster{option[0]}_swizzle{option[1]}"] = {
            "option": option, "err": rel_error(poisoned(fn, problem.shape), problem.reference[epilogue]),
            **stats(fn, problem.flops)}
    option = min(options, key=lambda o: options[o]["median"])
    best = options[option] if options[option]["median"] < tried[config]["median"] else tried[config]
    return {"config": config, "option": best.get("option", (0, 1)), "best": best, "configs": tried,
            "options": options}


def measure(module, rows: int, name: str, configs: list[str]) -> dict:
    problem = Problem(name, rows)
    row = {"gemm": name, "M": rows, "N": problem.shape[1], "K": GEMMS[name][1], "flops": problem.flops,
           "cublas_kernels": launched_kernels(problem.cublas(None))}
    for epilogue in (None, *problem.epilogues):
        label = epilogue or "plain"
        library = problem.cublas(epilogue)
        row[label] = {"cublas_err": rel_error(library(), problem.reference[epilogue]),
                      "cublas": stats(library, problem.flops), **best_cutlass(module, problem, epilogue, configs)}
        row[label]["ratio"] = row[label]["best"]["median"] / row[label]["cublas"]["median"]
    return row


def variants(row: dict) -> list[tuple[str, dict]]:
    """(label, measurements) of each variant a row holds: the plain GEMM first, then its epilogues."""
    return [(label, row[label]) for label in ("plain", *(e for e in EPILOGUE_CODE if e)) if label in row]


def summary_line(row: dict) -> str:
    parts = []
    for label, v in variants(row):
        parts.append(f"{label}: cuBLAS{'' if label == 'plain' else ' + op'} {v['cublas']['median']:.1f} µs, "
                     f"CUTLASS {v['config']} {tuple(v['option'])} {v['best']['median']:.1f} µs "
                     f"({v['best']['tflops']:.0f} TFLOP/s, ×{v['ratio']:.2f}, err {v['best']['err']:.1e})")
    return f"M={row['M']} {row['gemm']}: " + "; ".join(parts) + f" | cuBLAS kernel {row['cublas_kernels']}"


# What the layer's Hopper segments run (kernels/fs_gemm_sm90.cuh, from MIN_ROWS rows on): GEMM → (epilogue,
# (from this many rows on, configuration) from the most rows down).
MIN_ROWS = 65
SEGMENT_CONFIGS = {
    "attn_out": ("bias_residual", ((4096, "pp_128x128_c1x1"), (2048, "coop_128x96_c1x1"), (1024, "pp_64x96_c1x1"),
                                   (MIN_ROWS, "pp_64x64_c1x1"))),
    "ffn1": ("bias_gelu_lean", ((8192, "pp_128x128_c1x1_e64x64"), (4096, "coop_128x256_c2x1"),
                                (1024, "coop_128x192_c2x1"), (MIN_ROWS, "pp_64x64_c1x1"))),
    "ffn2": ("bias_residual", ((4096, "pp_128x128_c1x1"), (2048, "coop_128x96_c1x1"), (1024, "pp_64x96_c1x1"),
                               (MIN_ROWS, "pp_64x64_c1x1")))}


def segment_config(gemm: str, rows: int) -> tuple[str | None, str | None]:
    """(epilogue, configuration) the layer's segment runs for this GEMM at this many rows; (None, None) where it
    runs none (too few rows: the resident-weight kernel serves them)."""
    if gemm not in SEGMENT_CONFIGS or rows < MIN_ROWS:
        return None, None
    epilogue, tiers = SEGMENT_CONFIGS[gemm]
    return epilogue, next(config for min_rows, config in tiers if rows >= min_rows)


def _cell(stats: dict) -> str:
    return f"{stats['median']:.1f} ({stats['tflops']:.0f})"


def markdown(result: dict) -> str:
    """The tables of one probe run: the best configuration per problem, then the ones the segments use."""
    lines = [f"## {result['device']}, torch {result['torch']}: {len(result['configs'])} configurations built in "
             f"{result['build_s']:.0f} s", "",
             "µs (TFLOP/s) as the median of CUDA-event timings over graph replays, L2 flushed before each sample; "
             "errors are relative to the fp32 product. Fused variants are timed against cuBLAS plus the separate "
             "PyTorch op.", "",
             "| GEMM | M×N×K | variant | cuBLAS (+ op) | CUTLASS, best | configuration (raster, swizzle) | ratio | "
             "error CUTLASS / cuBLAS |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for label, v in variants(row):
            lines.append(f"| {row['gemm']} | {row['M']}×{row['N']}×{row['K']} | {label} | {_cell(v['cublas'])} | "
                         f"{_cell(v['best'])} | {v['config']} {tuple(v['option'])} | {v['ratio']:.2f} | "
                         f"{v['best']['err']:.1e} / {v['cublas_err']:.1e} |")
    lines += ["", "The configurations the segments use, CUTLASS's default tile order:", "",
              "| GEMM | M | epilogue | configuration | cuBLAS + op | segment GEMM | ratio | plain: cuBLAS | "
              "plain: same configuration | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        epilogue, config = segment_config(row["gemm"], row["M"])
        if epilogue not in row or config not in row[epilogue]["configs"]:
            continue
        fused, plain = row[epilogue], row["plain"]
        ours, mine = fused["configs"][config], plain["configs"][config]
        lines.append(f"| {row['gemm']} | {row['M']} | {epilogue} | {config} | {fused['cublas']['median']:.1f} | "
                     f"{ours['median']:.1f} | {ours['median'] / fused['cublas']['median']:.2f} | "
                     f"{plain['cublas']['median']:.1f} | {mine['median']:.1f} | "
                     f"{mine['median'] / plain['cublas']['median']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[2048, 32768], help="M = batch × sequence length")
    parser.add_argument("--gemms", nargs="+", choices=list(GEMMS), default=list(GEMMS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FUSIONSEARCH_CACHE_DIR", ".fscache")) /
                        "cutlass_probe")
    parser.add_argument("--render", nargs="+", type=Path, default=None,
                        help="print the markdown of earlier runs' JSON files instead of measuring")
    args = parser.parse_args()
    if args.render:
        print("\n".join(markdown(json.loads(path.read_text())) for path in args.render), end="")
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("cutlass_probe: needs an sm_90 GPU (H100/H200); the kernels use Hopper TMA and wgmma")
    module, build_s = build(args.cache, args.configs)
    print(f"built {len(args.configs)} configurations in {build_s:.1f} s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build_s": build_s,
              "configs": {name: CONFIGS[name] for name in args.configs}, "rows": []}
    for rows in args.rows:
        for name in args.gemms:
            result["rows"].append(measure(module, rows, name, args.configs))
            print(summary_line(result["rows"][-1]), flush=True)
            if args.out:  # after every row, so a killed run keeps what it measured
                args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
