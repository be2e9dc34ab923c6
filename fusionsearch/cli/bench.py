"""`fusionsearch bench --shape BxS …`: measure plans, segments and PyTorch baselines on the GPU.

`--all` is the exhaustive sweep (sweep.sweep_shape): every plan, then every segment alone, verified and timed in
this process (milliseconds a plan), then the baselines. Nothing isolates a kernel there: a crashing kernel stops
the sweep, and `--resume` continues it from the records file. `--masks` and `--segments` measure each item in an
isolated worker process (about a second each), so a crash ends as that item's status and the next one runs.
"""
from __future__ import annotations

from pathlib import Path

from .. import settings
from ..config import LayerConfig, parse_shape
from ..errors import FusionSearchError
from .output import add_format_argument, print_json, print_table

# Rows of the table (and JSON results) per kind and outcome: the fastest successes and the first failures.
SHOWN_PER_GROUP = 10


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure fusion plans, segments and PyTorch baselines on the GPU",
        description="Build, verify and time fusion plans (or single segments) and the PyTorch baselines on one "
                    "shape, appending one JSON record per measurement; print the best plan's speed-up over the "
                    "best baseline measured in the same run. Needs a CUDA GPU.")
    parser.add_argument("--shape", required=True, help="batch x sequence length, e.g. 16x128")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--masks", nargs="+", metavar="M", help="plans to measure, as masks (e.g. 6826 0x1aaa)")
    what.add_argument("--all", action="store_true",
                      help="the exhaustive sweep: every canonical plan (18,432), every segment alone and the "
                           "baselines (default set unless --baselines names some); plans and segments run in "
                           "this process on one GPU (minutes; a crashing kernel stops the sweep, --resume "
                           "continues it), while --masks uses isolated workers")
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
                        help="skip items the records file already holds a final result for (with --all: "
                             "continue a sweep that was stopped or crashed)")
    parser.add_argument("--compile-timeout", type=float, default=900.0, metavar="S",
                        help="seconds a build may take before the worker is killed (default: 900; with --all "
                             "it limits the baselines)")
    parser.add_argument("--run-timeout", type=float, default=120.0, metavar="S",
                        help="seconds a worker's verification plus timing may take (default: 120; with --all "
                             "it limits the baselines)")
    parser.add_argument("--flush-l2", action="store_true",
                        help="evict the L2 before every sample instead of rotating weight and input sets "
                             "(workers only: not with --all)")
    parser.add_argument("--gpus", type=int, nargs="+", metavar="I",
                        help="GPU indices to use (default: all; --all uses one, default the first)")
    parser.add_argument("--no-floor", action="store_true", help="skip measuring the roofline ceilings")
    add_format_argument(parser)
    parser.set_defaults(handler=run)


def default_records_path(cfg: LayerConfig) -> Path:
    return settings.cache_dir() / "records" / f"bench-{cfg.shape_text}-h{cfg.hidden}x{cfg.heads}-ff{cfg.ffn}-{cfg.dtype}.jsonl"


def _check_options(args) -> None:
    """Refuse option values that cannot work before anything touches the GPU."""
    for flag, seconds in (("--compile-timeout", args.compile_timeout), ("--run-timeout", args.run_timeout)):
        if not seconds > 0:
            raise FusionSearchError(f"{flag} {seconds:g} is not above 0 seconds; give a positive time, e.g. "
                                    f"{flag} 600")
    if not args.all:
        return
    if args.gpus and len(args.gpus) > 1:
        raise FusionSearchError(f"--all sweeps in one process on one GPU, but --gpus names {len(args.gpus)} "
                                f"({' '.join(map(str, args.gpus))}); give one index, e.g. --gpus {args.gpus[0]}")
    if args.flush_l2:
        # Plans would rotate sets while baselines flushed the L2: their latencies would not compare.
        raise FusionSearchError("--flush-l2 applies to worker measurements only, and --all times plans in this "
                                "process with rotated weight and input sets; drop --flush-l2, or use --masks")


def _baseline_names(args) -> "list[str] | None":
    """The baselines asked for: None without --baselines, the default set for --baselines without names."""
    if args.baselines is None:
        return None
    from ..baselines import BASELINES, default_names

    for name in args.baselines:
        if name not in BASELINES:
            raise FusionSearchError(f"baseline {name!r} does not exist; choose from {', '.join(BASELINES)}")
    return args.baselines or default_names("cuda")


def _worker_items(args, baselines: "list[str] | None") -> list:
    """The items of a worker sweep: masks or segments, and baselines."""
    from ..mask import parse_mask
    from ..plan import all_segments

    items: list = []
    if args.masks:
        items += [parse_mask(m) for m in args.masks]
    elif args.segments:
        items += list(all_segments())
    items += baselines or []
    if not items:
        raise FusionSearchError("nothing to measure; give --masks M …, --all, --segments and/or --baselines")
    return items


def run(args) -> int:
    from .. import bench
    from ..baselines import floor_us

    batch, seq_len = parse_shape(args.shape)
    cfg = LayerConfig(batch=batch, seq_len=seq_len, heads=args.heads, head_size=args.head_size, ffn=args.ffn,
                      dtype=args.dtype, eps=args.eps)
    _check_options(args)
    baselines = _baseline_names(args)
    items = None if args.all else _worker_items(args, baselines)
    devices = bench.cuda_devices(args.gpus)  # the one-line "needs a CUDA GPU" error comes from here
    path = args.records or default_records_path(cfg)
    if args.all:
        ceilings, found = _sweep_exhaustive(cfg, args, baselines, (args.gpus or [0])[0], path)
    else:
        ceilings, found = _sweep_in_workers(cfg, args, items, devices, path)
    floor = floor_us(cfg, ceilings["peak_tflops"], ceilings["bandwidth_tbs"]) if ceilings else None
    report = _report(cfg, found, path, ceilings, floor)
    if args.format == "json":
        print_json(report)
    else:
        _print_table(report)
    return 0


def _sweep_in_workers(cfg: LayerConfig, args, items: list, devices: list[str], path: Path):
    """Each item in an isolated worker process: a crash or a hang ends as that item's status."""
    from .. import bench
    from ..worker import WorkerPool

    with WorkerPool(devices) as pool:
        ceilings = None if args.no_floor else bench.measure_ceilings(cfg, pool=pool)
        found = bench.run_sweep(cfg, items, path, resume=args.resume, pool=pool,
                                compile_timeout_s=args.compile_timeout, run_timeout_s=args.run_timeout,
                                flush_l2=args.flush_l2)
    return ceilings, found


def _sweep_exhaustive(cfg: LayerConfig, args, baselines: "list[str] | None", gpu: int, path: Path):
    """Every plan and segment in this process, then the baselines in workers, all on one GPU."""
    from .. import bench, sweep

    # Ceilings first, in a worker that is gone before the sweep starts timing on the same GPU.
    ceilings = None if args.no_floor else bench.measure_ceilings(cfg, gpus=[gpu])
    earlier = _unfinished(path)  # left by an earlier run that was killed: not this run's crash
    try:
        done = sweep.sweep_shape(cfg, path, baselines=baselines, device=f"cuda:{gpu}", resume=args.resume,
                                 compile_timeout_s=args.compile_timeout, run_timeout_s=args.run_timeout)
    except RuntimeError as error:  # CUDA faults surface as RuntimeError and leave this process's context unusable
        crashed = _unfinished(path)
        if crashed is None or crashed == earlier:
            raise
        raise FusionSearchError(_crash_message(crashed["key"], error)) from error
    return ceilings, done.found


def _unfinished(path: Path) -> "dict | None":
    """A trailing `started` record: the measurement that was running when a sweep stopped."""
    from .. import records

    last = None
    if Path(path).exists():
        for last in records.read_records(path, allow_foreign=True):
            pass
    return last if last and last["kind"] == "started" else None


def _crash_message(key: str, error: Exception) -> str:
    kind, _, name = key.partition(":")
    isolate = {"plan": f"--masks {name}", "segment": "--segments"}.get(kind, f"--baselines {name}")
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    return (f"the in-process sweep stopped at {key} ({reason}); rerun this command with {isolate} in place of "
            f"--all to record its failure in an isolated worker, then with --all --resume to continue after it")


def _report(cfg: LayerConfig, found: list[dict], path: Path, ceilings, floor) -> dict:
    from ..bench import best_of

    shown = _shown(found)
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
            "counts": _counts(found), "omitted": len(found) - len(shown), "results": shown}


def _order(record: dict) -> tuple:
    """Successes first, fastest first; then failures by key."""
    ok = record["status"] == "ok"
    return (not ok, record["latency_us"]["median"] if ok else 0.0, record["key"])


def _shown(found: list[dict]) -> list[dict]:
    """The records worth a row: the fastest and the first failures of each kind, SHOWN_PER_GROUP each (an
    exhaustive sweep has 18,000 plans; the records file holds them all)."""
    groups: dict[tuple, list[dict]] = {}
    for record in sorted(found, key=_order):
        group = groups.setdefault((record["kind"], record["status"] == "ok"), [])
        if len(group) < SHOWN_PER_GROUP:
            group.append(record)
    return sorted((r for group in groups.values() for r in group), key=_order)


def _counts(found: list[dict]) -> dict:
    """kind → status → how many records."""
    counts: dict[str, dict[str, int]] = {}
    for record in found:
        by_status = counts.setdefault(record["kind"], {})
        by_status[record["status"]] = by_status.get(record["status"], 0) + 1
    return counts


def _print_table(report: dict) -> None:
    base_us = report["best_baseline_us"]
    rows = []
    for record in report["results"]:
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
    if report["omitted"]:
        print(f"… {report['omitted']} more results in the records file")
    print()
    print("; ".join(f"{kind}s: " + ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
                    for kind, by_status in report["counts"].items()))
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
