"""`fusionsearch bench --shape BxS …`: measure plans, segments and PyTorch baselines on the GPU."""
from __future__ import annotations

from pathlib import Path

from .. import settings
from ..config import LayerConfig, parse_shape
from ..errors import FusionSearchError
from .output import add_format_argument, print_json, print_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure fusion plans, segments and PyTorch baselines on the GPU",
        description="Build, verify and time fusion plans (or single segments) and the PyTorch baselines on one "
                    "shape, appending one JSON record per measurement; print the best plan's speed-up over the "
                    "best baseline measured in the same run. Needs a CUDA GPU.")
    parser.add_argument("--shape", required=True, help="batch x sequence length, e.g. 16x128")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--masks", nargs="+", metavar="M", help="plans to measure, as masks (e.g. 6826 0x1aaa)")
    what.add_argument("--all", action="store_true", help="every canonical plan (18,432: hours)")
    what.add_argument("--segments", action="store_true", help="every segment kernel alone (150)")
    parser.add_argument("--baselines", nargs="*", metavar="NAME",
                        help="PyTorch baselines to measure too; without names the default set (all but "
                             "compile_max_autotune)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default=settings.DEFAULT_DTYPE,
                        help=f"element type (default: {settings.DEFAULT_DTYPE})")
    parser.add_argument("--heads", type=int, default=settings.DEFAULT_HEADS, help="attention heads (default: 12)")
    parser.add_argument("--head-size", type=int, default=settings.DEFAULT_HEAD_SIZE, help="head size (default: 64)")
    parser.add_argument("--ffn", type=int, default=settings.DEFAULT_FFN, help="intermediate size (default: 3072)")
    parser.add_argument("--eps", type=float, default=settings.DEFAULT_EPS, help="LayerNorm eps (default: 1e-12)")
    parser.add_argument("--records", type=Path, help="records file to append to (default: in the cache folder, "
                                                    "one per shape and dtype)")
    parser.add_argument("--resume", action="store_true",
                        help="skip items the records file already holds a final result for")
    parser.add_argument("--compile-timeout", type=float, default=900.0, metavar="S",
                        help="seconds a build may take before the worker is killed (default: 900)")
    parser.add_argument("--run-timeout", type=float, default=120.0, metavar="S",
                        help="seconds verification plus timing may take (default: 120)")
    parser.add_argument("--flush-l2", action="store_true",
                        help="evict the L2 before every sample instead of rotating weight and input sets")
    parser.add_argument("--gpus", type=int, nargs="+", metavar="I", help="GPU indices to use (default: all)")
    parser.add_argument("--no-floor", action="store_true", help="skip measuring the roofline ceilings")
    add_format_argument(parser)
    parser.set_defaults(handler=run)


def default_records_path(cfg: LayerConfig) -> Path:
    return settings.cache_dir() / "records" / f"bench-{cfg.shape_text}-h{cfg.hidden}x{cfg.heads}-ff{cfg.ffn}-{cfg.dtype}.jsonl"


def _items(args) -> list:
    from ..mask import parse_mask
    from ..plan import all_segments, enumerate_plans

    items: list = []
    if args.masks:
        items += [parse_mask(m) for m in args.masks]
    elif args.all:
        items += list(enumerate_plans())
    elif args.segments:
        items += list(all_segments())
    if args.baselines is not None:
        from ..baselines import BASELINES, default_names

        for name in args.baselines:
            if name not in BASELINES:
                raise FusionSearchError(f"baseline {name!r} does not exist; choose from {', '.join(BASELINES)}")
        items += args.baselines or default_names("cuda")
    if not items:
        raise FusionSearchError("nothing to measure; give --masks M …, --all, --segments and/or --baselines")
    return items


def run(args) -> int:
    from .. import bench
    from ..baselines import floor_us
    from ..worker import WorkerPool

    batch, seq_len = parse_shape(args.shape)
    cfg = LayerConfig(batch=batch, seq_len=seq_len, heads=args.heads, head_size=args.head_size, ffn=args.ffn,
                      dtype=args.dtype, eps=args.eps)
    items = _items(args)
    devices = bench.cuda_devices(args.gpus)  # the one-line "needs a CUDA GPU" error comes from here
    path = args.records or default_records_path(cfg)
    with WorkerPool(devices) as pool:
        ceilings = None if args.no_floor else bench.measure_ceilings(cfg, pool=pool)
        found = bench.run_sweep(cfg, items, path, resume=args.resume, pool=pool,
                                compile_timeout_s=args.compile_timeout, run_timeout_s=args.run_timeout,
                                flush_l2=args.flush_l2)
    floor = floor_us(cfg, ceilings["peak_tflops"], ceilings["bandwidth_tbs"]) if ceilings else None
    report = _report(cfg, found, path, ceilings, floor)
    if args.format == "json":
        print_json(report)
    else:
        _print_table(report)
    return 0


def _report(cfg: LayerConfig, found: list[dict], path: Path, ceilings, floor) -> dict:
    from ..bench import best_of

    best_plan = best_of(found, "plan") or best_of(found, "segment")
    best_base = best_of(found, "baseline")
    speedup = None
    if best_plan and best_base:
        speedup = best_base["latency_us"]["median"] / best_plan["latency_us"]["median"]
    return {"shape": cfg.shape_text, "dtype": cfg.dtype, "hidden": cfg.hidden, "heads": cfg.heads, "ffn": cfg.ffn,
            "records": str(path), "ceilings": ceilings, "floor_us": floor,
            "best": best_plan and best_plan["key"], "best_us": best_plan and best_plan["latency_us"]["median"],
            "best_baseline": best_base and best_base["baseline"],
            "best_baseline_us": best_base and best_base["latency_us"]["median"], "speedup": speedup,
            "results": found}


def _print_table(report: dict) -> None:
    def order(record):
        ok = record["status"] == "ok"
        return (not ok, record["latency_us"]["median"] if ok else 0.0, record["key"])

    base_us = report["best_baseline_us"]
    rows = []
    for record in sorted(report["results"], key=order):
        lat, err = record["latency_us"], record["error"] or {}
        rel = err.get("rel")
        rows.append([
            record["key"], record["status"],
            f"{lat['median']:.1f}" if lat else "–",
            f"{lat['p20']:.1f}–{lat['p80']:.1f}" if lat else "–",
            f"{rel:.2e}" if isinstance(rel, float) else "–",
            f"{base_us / lat['median']:.2f}×" if lat and base_us else "–",
            (record["message"] or "")[:80],
        ])
    print_table(["key", "status", "median µs", "p20–p80 µs", "rel error", "vs best baseline", "message"], rows)
    print()
    floor = f", floor {report['floor_us']:.1f} µs" if report["floor_us"] else ""
    if report["speedup"]:
        print(f"{report['shape']} {report['dtype']}: best {report['best']} {report['best_us']:.1f} µs vs best "
              f"baseline {report['best_baseline']} {report['best_baseline_us']:.1f} µs: "
              f"{report['speedup']:.2f}× speed-up{floor}")
    elif report["best"] or report["best_baseline"]:
        which = report["best"] or f"baseline {report['best_baseline']}"
        us = report["best_us"] or report["best_baseline_us"]
        print(f"{report['shape']} {report['dtype']}: best {which} {us:.1f} µs{floor} (no speed-up: plans and "
              f"baselines were not both measured)")
    else:
        print(f"{report['shape']} {report['dtype']}: nothing measured successfully; see the messages above")
    print(f"records: {report['records']}")
