"""Evaluate the search strategies by replaying recorded exhaustive sweeps, leaving one shape out at a time.

For each held-out shape: every strategy runs for ≥ 10 seeds against a replay of that shape's sweep (xgb_warm first
trains on the other shapes; xgb_hand_start measures the hand-fused plans in its first batch; xgb_one_side does not
make every batch measure both sides of the attention-kernel flag); we record best-so-far ÷ true optimum after every
trial (PNG per shape) and the trials needed to come within 1 %, 2 % and 5 % of the optimum. A cost model trained
on the other shapes only is scored zero-shot on the held-out shape: Kendall τ, top-k recall, the true rank of its
top-1 and its high/low class.
Writes summary.md and summary.json (and one PNG per shape) under --out. Runs on a CPU.

    PYTHONPATH=. python experiments/evaluate_search.py sweeps/*.jsonl.gz --out experiments/results/search-eval

Records from tests/synthetic_sweeps.py say SYNTHETIC in their GPU name; the summary then says so in its first line.
Such results exercise the script and are not measurements: do not commit them as results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the source tree without installing

from fusionsearch.config import LayerConfig  # noqa: E402
from fusionsearch.errors import FusionSearchError  # noqa: E402
from fusionsearch.costmodel import SHAPE_COLUMNS, XGBCostModel, layer_config  # noqa: E402
from fusionsearch.search import (ReplayMeasurer, SearchError, SearchSpace, hand_fused_start,  # noqa: E402
                                 load_records, make_tuner, run_search, shape_rows)

STRATEGIES = ("random", "segment_dp", "xgb", "xgb_one_side", "xgb_hand_start", "xgb_warm")
TOLERANCES = (0.01, 0.02, 0.05)


def kendall_tau(x: np.ndarray, y: np.ndarray, chunk: int = 512) -> float:
    """Kendall's τ-b, exact, in chunks of rows (O(n²) work, O(chunk · n) memory; 18,432 plans take seconds)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2:
        return math.nan
    score = tied_x = tied_y = 0
    for start in range(0, n, chunk):
        dx = np.sign(x[start:start + chunk, None] - x[None, :])
        dy = np.sign(y[start:start + chunk, None] - y[None, :])
        score += int((dx * dy).sum())
        tied_x += int((dx == 0).sum())
        tied_y += int((dy == 0).sum())
    pairs = n * (n - 1)  # ordered pairs; the diagonal counts as tied in both and is removed below
    denominator = math.sqrt((pairs - (tied_x - n)) * (pairs - (tied_y - n)))
    return score / denominator if denominator else math.nan


def zero_shot(frame, cfg: LayerConfig, q: float) -> dict:
    """Score a model trained on every other shape against the held-out shape's recorded latencies."""
    own = shape_rows(frame, cfg)
    others = frame.drop(index=own.index)
    truth = own[(own["kind"] == "plan") & (own["status"] == "ok")].groupby("canonical_id")["latency_us"].median()
    if others[(others["kind"] == "plan") & (others["status"] == "ok")].empty or truth.empty:
        return {"skipped": "no other shape to train on"}
    model = XGBCostModel(seed=0, q=q).fit(others)
    ids = truth.index.to_numpy(dtype=np.int64)
    latency = truth.to_numpy()
    predicted = model.predict(ids, cfg)
    true_rank = np.argsort(np.argsort(latency, kind="stable"), kind="stable") + 1
    by_prediction = np.argsort(predicted, kind="stable")
    recall = {}
    for k in sorted({10, 50, max(1, len(ids) // 100)}):
        if k <= len(ids):
            recall[str(k)] = len(set(np.argsort(latency, kind="stable")[:k]) & set(by_prediction[:k])) / k
    true_high = latency <= np.percentile(latency, q)
    predicted_high = model.predict_class(ids, cfg).astype(bool)
    balanced = 0.5 * (np.mean(predicted_high[true_high]) + np.mean(~predicted_high[~true_high]))
    return {"plans": int(len(ids)), "trained_on": model.trained_on, "kendall_tau": kendall_tau(predicted, latency),
            "top_k_recall": recall, "top1_true_rank": int(true_rank[by_prediction[0]]),
            "top1_ratio": float(latency[by_prediction[0]] / latency.min()),
            "class_balanced_accuracy": float(balanced), "q": q}


def first_within(ratio: np.ndarray, tolerance: float) -> int | None:
    """1-based trial at which best-so-far ÷ optimum first falls within tolerance (None: never)."""
    hits = np.flatnonzero(ratio <= 1.0 + tolerance + 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


def run_strategy(name: str, frame, cfg: LayerConfig, measurer, space, seed: int, budget: int,
                 batch_size: int) -> np.ndarray:
    """best-so-far latency per trial (length budget, inf before the first ok plan, held after a stop)."""
    warm, options = None, {}
    if name == "xgb_warm":
        warm = frame.drop(index=shape_rows(frame, cfg).index)
    if name == "xgb_hand_start":
        options["start"] = hand_fused_start()
    if name == "xgb_one_side":
        options["cover_attention"] = False
    tuner = make_tuner("xgb" if name.startswith("xgb") else name, space, seed, warm=warm, **options)
    result = run_search(tuner, measurer, budget, batch_size=batch_size)
    best = result.best_so_far()
    if len(best) < budget:  # exhausted (e.g. a small replay): the best stays what it was
        best = np.concatenate([best, np.full(budget - len(best), best[-1] if len(best) else np.inf)])
    return best


def plot(path: Path, cfg: LayerConfig, curves: dict[str, np.ndarray], synthetic: bool) -> None:
    """Median and inter-quartile band of best-so-far ÷ optimum against trials, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (name, ratios) in enumerate(curves.items()):
        trials = np.arange(1, ratios.shape[1] + 1)
        capped = np.minimum(ratios, 10.0)  # inf (no ok plan yet) lies far above the axis either way
        median = np.median(capped, axis=0)
        low, high = np.percentile(capped, 25, axis=0), np.percentile(capped, 75, axis=0)
        ax.plot(trials, median, color=f"C{index}", label=f"{name} (median of {ratios.shape[0]})")
        ax.fill_between(trials, low, high, color=f"C{index}", alpha=0.2, lw=0)
    for tolerance in TOLERANCES:
        ax.axhline(1 + tolerance, color="grey", lw=0.6, ls=":")
    ax.set_ylim(0.99, 1.6)
    ax.set_xlabel("trials (segment measurements included)")
    ax.set_ylabel("best so far ÷ optimum")
    ax.set_title(f"held-out {cfg.shape_text} {cfg.dtype}" + (" — SYNTHETIC data, not a measurement" if synthetic
                                                              else ""))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _median(values: list) -> float | None:
    """Median over seeds counting 'never' as infinite; None when at least half the seeds never got there."""
    median = float(np.median([math.inf if v is None else v for v in values]))
    return median if math.isfinite(median) else None


def evaluate(paths: list[Path], out: Path, seeds: int, budget: int, batch_size: int, strategies: list[str],
             q: float) -> dict:
    """Run the whole evaluation; write the PNGs, summary.md and summary.json under out; return the summary."""
    frame = load_records(paths)
    synthetic = bool(frame["gpu_name"].astype(str).str.contains("SYNTHETIC").any()
                     or (frame["template_hash"] == "synthetic").any())
    plans = frame[frame["kind"] == "plan"]
    layers = plans[list(SHAPE_COLUMNS)].drop_duplicates().sort_values(list(SHAPE_COLUMNS))
    configs = [layer_config(row) for _, row in layers.iterrows()]
    if not configs:
        raise SearchError(f"{', '.join(map(str, paths))} hold no kind=plan records; give recorded sweeps")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"synthetic": synthetic, "sweeps": [str(p) for p in paths], "seeds": seeds, "budget": budget,
               "batch_size": batch_size, "shapes": []}
    for cfg in configs:
        started = time.time()
        measurer = ReplayMeasurer(frame, cfg, source="sweep")
        space = SearchSpace(cfg, measurer.candidates())
        optimum = min(v for status, v in measurer.plans.values() if status == "ok")
        shape = {"shape": cfg.shape_text, "dtype": cfg.dtype, "plans": len(space), "optimum_us": optimum,
                 "zero_shot": zero_shot(frame, cfg, q) if len(configs) > 1 else {"skipped": "one shape only"},
                 "strategies": {}}
        curves = {}
        for name in strategies:
            if name == "xgb_warm" and len(configs) < 2:
                shape["strategies"][name] = {"skipped": "no other shape to warm-start from"}
                continue
            try:
                ratios = np.array([run_strategy(name, frame, cfg, measurer, space, seed, budget, batch_size)
                                   for seed in range(seeds)]) / optimum
            except SearchError as error:  # e.g. segment_dp without segment records
                shape["strategies"][name] = {"skipped": str(error)}
                continue
            curves[name] = ratios
            reach = {f"{t:.0%}": [first_within(r, t) for r in ratios] for t in TOLERANCES}
            shape["strategies"][name] = {
                "trials_to_within": reach,
                "median_trials_to_within": {k: _median(v) for k, v in reach.items()},
                "reached": {k: sum(x is not None for x in v) for k, v in reach.items()},
                "final_ratio_median": float(np.median(ratios[:, -1])),
                "final_ratio_worst": float(np.max(ratios[:, -1])),
            }
        if curves:
            png = out / f"search_{cfg.shape_text}_{cfg.dtype}.png"
            plot(png, cfg, curves, synthetic)
            shape["plot"] = png.name
        shape["seconds"] = round(time.time() - started, 1)
        summary["shapes"].append(shape)
        print(f"{cfg.shape_text} {cfg.dtype}: done in {shape['seconds']} s", file=sys.stderr)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    """The summary as a short markdown report."""
    lines = []
    if summary["synthetic"]:
        lines += ["**SYNTHETIC DATA: these sweeps come from tests/synthetic_sweeps.py, an analytic model. Nothing "
                  "below is a measurement; do not quote or commit it as a result.**", ""]
    lines += ["# Search evaluation: leave one shape out", "",
              f"Sweeps: {', '.join(summary['sweeps'])}. {summary['seeds']} seeds per strategy, budget "
              f"{summary['budget']} trials, batches of {summary['batch_size']}. A trial is one measurement "
              "(segment-dp pays one per segment kernel before its first plan).", ""]
    for shape in summary["shapes"]:
        lines += [f"## {shape['shape']} {shape['dtype']} ({shape['plans']} plans, optimum "
                  f"{shape['optimum_us']:.1f} µs)", ""]
        lines += ["| strategy | median trials to 1 % | to 2 % | to 5 % | seeds within 1 % | final ratio median | "
                  "worst |", "|---|---|---|---|---|---|---|"]
        for name, data in shape["strategies"].items():
            if "skipped" in data:
                lines.append(f"| {name} | skipped: {data['skipped']} | | | | | |")
                continue
            med = data["median_trials_to_within"]
            cell = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
            lines.append(f"| {name} | {cell(med['1%'])} | {cell(med['2%'])} | {cell(med['5%'])} | "
                         f"{data['reached']['1%']}/{summary['seeds']} | {data['final_ratio_median']:.3f} | "
                         f"{data['final_ratio_worst']:.3f} |")
        zs = shape["zero_shot"]
        lines.append("")
        if "skipped" in zs:
            lines.append(f"Zero-shot model: skipped ({zs['skipped']}).")
        else:
            recall = ", ".join(f"top-{k} {v:.2f}" for k, v in zs["top_k_recall"].items())
            lines.append(f"Zero-shot model (trained on the other shapes): Kendall τ {zs['kendall_tau']:.3f}; "
                         f"recall {recall}; its top-1 is the true #{zs['top1_true_rank']} "
                         f"({zs['top1_ratio']:.3f}× the optimum); high/low class balanced accuracy "
                         f"{zs['class_balanced_accuracy']:.2f} (q {zs['q']:g} %).")
        if "plot" in shape:
            lines += ["", f"![search curve]({shape['plot']})"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="records files of exhaustive sweeps (.jsonl[.gz])")
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.md, summary.json and PNGs")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per strategy and shape (default: 10)")
    parser.add_argument("--budget", type=int, default=300, help="trials per search (default: 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="plans between refits (default: 16)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all)")
    parser.add_argument("--q", type=float, default=10.0, help="high class = fastest q %% (default: 10)")
    args = parser.parse_args(argv)
    strategies = [s.strip().replace("-", "_") for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or args.seeds < 1 or args.budget < 1:
        parser.error(f"strategies {unknown} are unknown (use {', '.join(STRATEGIES)})" if unknown
                     else "--seeds and --budget must be at least 1")
    try:
        summary = evaluate(args.sweeps, args.out, args.seeds, args.budget, args.batch_size, strategies, args.q)
    except FusionSearchError as error:
        print(f"evaluate_search: error: {error}", file=sys.stderr)
        return 2
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
