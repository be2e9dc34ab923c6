"""`fusionsearch search --shape BxS`: find the fastest fusion plan on the GPU, or by replaying a recorded sweep."""
from __future__ import annotations

import sys
from pathlib import Path

from .. import settings
from ..errors import FusionSearchError
from .output import add_format_argument, print_json, print_table

DEFAULT_BUDGET = 200
DEFAULT_PATIENCE = 10  # xgb batches without improvement before it stops early


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="search for the fastest fusion plan of one shape",
        description="Measure fusion plans chosen by a strategy until the budget is spent, then save the best plan "
                    "and a cost model under --out and print the plan with its speed-up over the best PyTorch "
                    "baseline. Needs a CUDA GPU, or --replay F to replay a recorded sweep on the CPU.")
    parser.add_argument("--shape", required=True, help="batch x sequence length, e.g. 16x128")
    parser.add_argument("--budget", type=int, help=f"measurements to make, segment kernels included (default: "
                                                   f"{DEFAULT_BUDGET}; exhaustive: every plan; segment-dp: "
                                                   f"every segment + {DEFAULT_BUDGET // 4} plans)")
    parser.add_argument("--strategy", choices=("random", "exhaustive", "segment-dp", "xgb"), default="xgb",
                        help="how to choose plans (default: xgb)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"),
                        help=f"element type (default: {settings.DEFAULT_DTYPE}; with --replay, what it holds)")
    parser.add_argument("--records", type=Path, help="records file to append measurements to (default: "
                                                     "records.jsonl under --out); not with --replay")
    parser.add_argument("--resume", action="store_true",
                        help="count the plans and segments --records already holds for this shape, GPU and "
                             "templates as trials of this search instead of measuring them again")
    parser.add_argument("--replay", type=Path, metavar="F",
                        help="answer from the records of a recorded sweep instead of measuring (no GPU needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, help="folder for best.json, model.json, search.json and the curve "
                                                 "(default: a folder per shape under the cache folder)")
    parser.add_argument("--warm-start", type=Path, nargs="+", metavar="F", default=[],
                        help="records of other shapes to train the xgb model on before the first batch")
    parser.add_argument("--hand-fused-start", action="store_true",
                        help="xgb only: measure the hand-fused plans of other systems (ByteTransformer, "
                             "FasterTransformer, unfused) in the first batch, so that the result is never slower "
                             "than theirs; on recorded sweeps it gets within 1 %% of the optimum sooner at four "
                             "of seven shapes, less surely at two (default: a random first batch, half of it "
                             "plans with the attention kernel)")
    parser.add_argument("--batch-size", type=int, default=16, help="plans measured between refits (default: 16)")
    parser.add_argument("--patience", type=int,
                        help=f"stop after this many batches without a better plan (default: {DEFAULT_PATIENCE} "
                             "for xgb, never for the others)")
    add_format_argument(parser)
    parser.set_defaults(handler=run)


def default_out_dir(cfg, strategy: str) -> Path:
    """Where a search keeps its outputs unless --out says otherwise (under settings.cache_dir())."""
    return (settings.cache_dir() / "search"
            / f"{cfg.shape_text}-h{cfg.hidden}x{cfg.heads}-ff{cfg.ffn}-{cfg.dtype}-{strategy}")


def _check_args(args) -> None:
    for name in ("budget", "batch_size", "patience"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise FusionSearchError(f"--{name.replace('_', '-')} {value} is below 1; give a positive count")
    if args.replay is not None and (args.records is not None or args.resume):
        raise FusionSearchError("--replay answers from a recorded sweep and measures nothing; drop --records "
                                "and --resume, or drop --replay to measure on the GPU")
    for flag, given in (("--warm-start", args.warm_start), ("--hand-fused-start", args.hand_fused_start)):
        if given and args.strategy != "xgb":
            raise FusionSearchError(f"{flag} only guides --strategy xgb, not {args.strategy}; drop it or use xgb")


def _measurer(args, batch: int, seq_len: int):
    """(measurer, out folder): a ReplayMeasurer for --replay, else a GpuMeasurer (exit 2 without CUDA)."""
    from ..config import LayerConfig
    from ..search import GpuMeasurer, ReplayMeasurer

    if args.replay is not None:
        measurer = ReplayMeasurer.from_file(args.replay, batch, seq_len, args.dtype)
        return measurer, (args.out or default_out_dir(measurer.cfg, args.strategy)).expanduser()
    import torch

    if not torch.cuda.is_available():
        raise FusionSearchError(f"searching needs a CUDA GPU and torch {torch.__version__} sees none; run on a GPU "
                                "machine or replay a recorded sweep with --replay F")
    cfg = LayerConfig(batch, seq_len, dtype=args.dtype or settings.DEFAULT_DTYPE)
    out = (args.out or default_out_dir(cfg, args.strategy)).expanduser()
    return GpuMeasurer(cfg, args.records or out / "records.jsonl", resume=args.resume), out


def _prior(args, measurer) -> list:
    """Trials a resumed GPU search already paid for: final records of this shape, GPU and templates."""
    if not args.resume or args.replay is not None or not measurer.records_path.exists():
        return []
    from ..search import load_records, trials_from_records

    frame = load_records(measurer.records_path)
    env = measurer.environment()
    frame = frame[(frame["gpu_name"] == env["gpu"]["name"]) & (frame["template_hash"] == env["template_hash"])]
    return trials_from_records(frame, measurer.cfg)


def _progress(budget: int, initial: int):
    """A tqdm bar on stderr (trial, current and best latency, failures, ETA); silent when not a terminal."""
    from tqdm.auto import tqdm

    bar = tqdm(total=budget, initial=initial, unit="trial", desc="search", dynamic_ncols=True, file=sys.stderr,
               disable=not sys.stderr.isatty())

    def on_batch(result, batch) -> None:
        bar.update(len(batch))
        last = batch[-1]
        current = f"{last.latency_us:.1f} µs" if last.ok else last.status
        best = result.best
        bar.set_postfix_str(f"current {current}, best {f'{best.latency_us:.1f} µs' if best else '–'}, "
                            f"failures {result.failures}")

    return bar, on_batch


def run(args) -> int:
    from ..config import parse_shape
    from ..costmodel import require_xgboost
    from ..search import SearchSpace, hand_fused_start, load_records, make_tuner, run_search
    from ..search.report import save_outputs, search_report

    _check_args(args)
    require_xgboost()  # every strategy saves a cost model at the end
    batch, seq_len = parse_shape(args.shape)
    measurer, out = _measurer(args, batch, seq_len)
    cfg = measurer.cfg
    try:
        warm = load_records(args.warm_start) if args.warm_start else None
        space = SearchSpace(cfg, measurer.candidates())
        options = {"start": hand_fused_start()} if args.hand_fused_start else {}
        tuner = make_tuner(args.strategy, space, args.seed, warm=warm, **options)
        budget = args.budget or _default_budget(args.strategy, tuner, space)
        patience = args.patience if args.patience is not None else (DEFAULT_PATIENCE if args.strategy == "xgb"
                                                                    else None)
        prior = _prior(args, measurer)
        bar, on_batch = _progress(budget, min(len(prior), budget))
        try:
            result = run_search(tuner, measurer, budget, batch_size=args.batch_size, patience=patience,
                                prior=prior, on_batch=on_batch)
        finally:
            bar.close()
        baselines = measurer.baselines()
    finally:
        close = getattr(measurer, "close", None)
        if close is not None:
            close()
    report = search_report(result, baselines, source=str(args.replay or measurer.records_path))
    report["saved"] = save_outputs(out, result, report, warm)
    if args.format == "json":
        print_json(report)
    else:
        _print_report(report)
    return 0 if report["best"] else 1


def _default_budget(strategy: str, tuner, space) -> int:
    if strategy == "exhaustive":
        return len(space)
    if strategy == "segment-dp":
        return len(tuner.needed) + DEFAULT_BUDGET // 4
    return DEFAULT_BUDGET


def _print_report(report: dict) -> None:
    layer = report["layer"]
    print(f"search {layer['shape']} {layer['dtype']} (hidden {layer['hidden']}, {layer['heads']} heads, ffn "
          f"{layer['ffn']}), strategy {report['strategy']}, seed {report['seed']}: {report['trials']} trials, "
          f"{report['failures']} failed, stopped: {report['stopped']}")
    best = report["best"]
    if best is None:
        print("no plan measured ok; see the records for the failures")
    else:
        print(f"best plan: mask {best['mask']} = {best['bits']}, seed format: {best['seed']}")
        rows = [[f"{s['positions'][0]}–{s['positions'][1]}" if s["fused"] else f"{s['positions'][0]}",
                 "hand-written attention" if s["attention_kernel"] else ("fused" if s["fused"] else "single"),
                 " + ".join(s["ops"])] for s in best["segments"]]
        print_table(["positions", "kernel", "operators"], rows)
        baseline = report["baseline"]
        versus = (f"; best PyTorch baseline {baseline['name']} {baseline['latency_us']:.1f} µs, speed-up "
                  f"{report['speedup']:.2f}×" if baseline else "; no PyTorch baseline measured ok for this shape")
        print(f"latency {best['latency_us']:.1f} µs{versus}")
    for name, path in report["saved"].items():
        print(f"{name}: {path}")
    print(f"measurements: {report['source']}")
