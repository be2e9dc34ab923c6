"""Summarise recorded sweeps: best plan, spread, hard-coded plans, PyTorch baselines and the roofline floor.

    PYTHONPATH=. python experiments/summarize_sweeps.py experiments/data/sweeps --out experiments/results/sweeps-h100 \
        [--remeasure experiments/data/remeasure] [--baselines-again experiments/data/perf-h100]

--remeasure names a folder of records files (same names as the sweeps) from a separate device run that timed a
sample of plans, every segment and some baselines again; the summary compares them with the sweep.
--baselines-again names the performance report's records (records-<shape>-fp16.jsonl*), whose PyTorch baselines
are compared with the sweep's (its plans ran on other kernels, so only the baselines are comparable).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPE_ORDER = ["1x32", "1x128", "8x128", "16x128", "16x512", "64x128", "64x512"]


def summarize(path: Path, ceilings: dict) -> dict:
    from fusionsearch.config import LayerConfig
    from fusionsearch.mask import decode
    from fusionsearch.ops import roofline_floor_us
    from fusionsearch.plan import hand_fused_plans
    from fusionsearch.records import load_frame

    frame = load_frame(path)
    plans = frame[frame["kind"] == "plan"]
    ok = plans[plans["status"] == "ok"]
    per_plan = ok.groupby("canonical_id")["latency_us"]
    latency = per_plan.median()
    repeats = per_plan.agg(["min", "max", "count"])
    twice = repeats[repeats["count"] > 1]
    best_id = int(latency.idxmin())
    best_row = ok[ok["canonical_id"] == best_id].iloc[0]
    batch, seq = int(best_row["batch"]), int(best_row["seq_len"])
    cfg = LayerConfig(batch=batch, seq_len=seq, dtype=str(best_row["dtype"]))
    base = frame[(frame["kind"] == "baseline") & (frame["status"] == "ok")].set_index("baseline")["latency_us"]
    best_torch = base.idxmin() if len(base) else None
    hard = {}
    for name, plan in hand_fused_plans().items():
        hard[name] = {"mask": plan.mask, "latency_us": float(latency.get(plan.canonical_id, float("nan")))}
    best_plan = decode(best_id)
    return {
        "shape": f"{batch}x{seq}", "records": path.name, "plans_measured": int(latency.size),
        "exhaustive": int(latency.size) == 18432, "failures": int((plans["status"] != "ok").sum()),
        "best": {"mask": best_id, "bits": best_plan.bits, "plan": best_plan.describe(),
                 "kernels": best_plan.kernel_count, "latency_us": float(latency[best_id]),
                 "p20_us": float(best_row["p20_us"]), "p80_us": float(best_row["p80_us"])},
        "spread_us": {"best": float(latency.min()), "median": float(latency.median()), "worst": float(latency.max())},
        "hard_coded": hard, "baselines_us": {k: float(v) for k, v in base.items()},
        "best_pytorch": best_torch, "speedup": float(base.min() / latency[best_id]) if len(base) else None,
        "floor_us": roofline_floor_us(cfg, ceilings["peak_tflops"], ceilings["bandwidth_tbs"]),
        "timed_twice": {"plans": int(len(twice)),
                        "max_rel_diff": float(((twice["max"] - twice["min"]) / twice["min"]).max()) if len(twice) else None},
        "segments_ok": int(((frame["kind"] == "segment") & (frame["status"] == "ok")).sum()),
    }


KINDS = (("plan", "canonical_id"), ("segment", "key"), ("baseline", "baseline"))


def compare_remeasure(sweep: Path, again: Path, kinds: tuple[str, ...] = ("plan", "segment", "baseline")) -> dict:
    """Per record kind: how far the separate run's medians are from the sweep's (same keys only)."""
    from fusionsearch.records import load_frame

    first, second = load_frame(sweep), load_frame(again)
    out = {"run": str(second["time"].min()), "sweep_run": str(first["time"].min())}
    for kind, key in (pair for pair in KINDS if pair[0] in kinds):
        def medians(frame):
            rows = frame[(frame["kind"] == kind) & (frame["status"] == "ok")]
            return rows.groupby(key)["latency_us"].median()
        before, after = medians(first), medians(second)
        ratio = (after / before).dropna()
        if ratio.empty:
            continue
        deviation = (ratio - 1.0).abs()
        worst = deviation.idxmax()
        out[kind] = {"count": int(ratio.size), "median_ratio": float(ratio.median()),
                     "median_abs_dev": float(deviation.median()), "within_2pct": float((deviation <= 0.02).mean()),
                     "worst": {"key": str(int(worst)) if kind == "plan" else str(worst),
                               "ratio": float(ratio[worst])}}
        if kind == "baseline":  # few enough to list: name → (sweep µs, re-measured µs)
            out[kind]["pairs"] = {name: (float(before[name]), float(after[name])) for name in ratio.index}
    return out


def _graph_deviation(comparison: dict) -> str:
    """Median and largest |ratio − 1| over the graph-captured baselines of one shape, as text."""
    pairs = {n: p for n, p in comparison.get("baseline", {}).get("pairs", {}).items() if n.endswith("_graph")}
    if not pairs:
        return "none"
    devs = sorted(abs(after / before - 1.0) for before, after in pairs.values())
    return f"{len(devs)} within {devs[-1] * 100:.1f} % (median {devs[len(devs) // 2] * 100:.1f} %)"


def remeasure_markdown(comparisons: dict, title: str = "Re-measured in a separate run",
                       intro: str = "A later device run (its own process, inputs and weights) timed a random sample "
                                    "of plans, every segment and two baselines again; ratio = re-measured ÷ sweep "
                                    "median.") -> list[str]:
    lines = ["", f"## {title}", "", intro, "",
             "| B×S | kind | count | median ratio | median abs. deviation | within 2 % | worst (ratio) |",
             "|---|---|---|---|---|---|---|"]
    for shape, c in comparisons.items():
        for kind in ("plan", "segment", "baseline"):
            if kind in c:
                k = c[kind]
                lines.append(f"| {shape} | {kind} | {k['count']} | {k['median_ratio']:.4f} | "
                             f"{k['median_abs_dev'] * 100:.2f} % | {k['within_2pct'] * 100:.0f} % | "
                             f"{k['worst']['key']} ({k['worst']['ratio']:.3f}) |")
    return lines


BASELINES_AGAIN_INTRO = ("The PyTorch baselines do not depend on our kernels, so the performance report's run "
                         "(`perf-h100.md`, another machine and day) re-measured every one of them; ratio = that run "
                         "÷ sweep median. Eager baselines depend on how fast the host launches; the graph-captured "
                         "ones are summarised below the table.")


def markdown(rows: list[dict], ceilings: dict, meta: dict, comparisons: dict | None = None,
             baselines_again: dict | None = None) -> str:
    lines = ["# fp16 sweeps on the H100 (BERT-base: hidden 768, 12 heads, FF 3072)", "",
             f"GPU {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, template hash {meta['template_hash']}. "
             f"Measured ceilings in the same runs: {ceilings['peak_tflops']:.0f} TFLOP/s fp16 matmul (8192³), "
             f"{ceilings['bandwidth_tbs']:.2f} TB/s device copy. Latencies are medians of CUDA-event timings over "
             "CUDA-graph replays with weights and inputs rotated past the L2; every plan was checked against the fp32 "
             "reference (NaN-poisoned outputs and intermediates) before it was timed.",
             "Commands: `experiments/run_sweeps.py` (records in `experiments/data/sweeps/`), this summary by "
             "`experiments/summarize_sweeps.py`. A `nan` baseline was not measured at that shape (the torch.compile "
             "baselines joined the sweep runs after the three small shapes were swept).", "",
             "| B×S | plans | best plan (mask) | best µs | best / median / worst µs | best PyTorch µs (which) | speed-up | floor µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["spread_us"]
        which = r["best_pytorch"]
        torch_us = r["baselines_us"].get(which, float("nan")) if which else float("nan")
        lines.append(f"| {r['shape']} | {r['plans_measured']}{' (all)' if r['exhaustive'] else ' (sample)'} | "
                     f"{r['best']['mask']} | {r['best']['latency_us']:.1f} | {s['best']:.1f} / {s['median']:.1f} / "
                     f"{s['worst']:.1f} | {torch_us:.1f} ({which}) | {r['speedup']:.2f}× | {r['floor_us']:.1f} |")
    lines += ["", "## Best plans", ""]
    for r in rows:
        lines.append(f"- **{r['shape']}**: mask {r['best']['mask']} ({r['best']['bits']}), {r['best']['kernels']} kernels, "
                     f"{r['best']['latency_us']:.1f} µs (p20 {r['best']['p20_us']:.1f}, p80 {r['best']['p80_us']:.1f}): "
                     f"{r['best']['plan']}")
    from fusionsearch.plan import HAND_FUSED

    names = list(HAND_FUSED)
    lines += ["", "## Hand-fused plans and baselines (µs)", "",
              "| B×S | " + " | ".join(["ByteTransformer", "FasterTransformer", "unfused"]) + " | searched best | "
              + " | ".join(sorted({b for r in rows for b in r["baselines_us"]})) + " |",
              "|---|" + "---|" * (4 + len({b for r in rows for b in r["baselines_us"]}))]
    for r in rows:
        base = " | ".join(f"{r['baselines_us'].get(b, float('nan')):.1f}" for b in sorted({b for r2 in rows for b in r2["baselines_us"]}))
        hard = " | ".join(f"{r['hard_coded'][n]['latency_us']:.1f}" for n in names)
        lines.append(f"| {r['shape']} | {hard} | {r['best']['latency_us']:.1f} | {base} |")
    lines += ["", "## Repeatability", ""]
    for r in rows:
        t = r["timed_twice"]
        if t["plans"]:
            lines.append(f"- {r['shape']}: {t['plans']} plans timed twice in the sweep; largest relative difference "
                         f"{t['max_rel_diff'] * 100:.1f} %.")
    lines.append("")
    lines.append("Segments timed alone (for the segment DP): " + ", ".join(f"{r['shape']} {r['segments_ok']}" for r in rows) + ".")
    if comparisons:
        lines += remeasure_markdown(comparisons)
    if baselines_again:
        lines += remeasure_markdown(baselines_again, "Baselines re-measured in the performance report's run",
                                    BASELINES_AGAIN_INTRO)
        lines.append("")
        lines.append("Graph-captured baselines only (the ones that decide the speed-ups): "
                     + "; ".join(f"{shape} {_graph_deviation(c)}" for shape, c in baselines_again.items()) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path stem for .md and .json")
    parser.add_argument("--remeasure", type=Path, default=None, help="folder of records from a separate run")
    parser.add_argument("--baselines-again", type=Path, default=None,
                        help="records of a later run (records-<shape>-fp16.jsonl*) whose baselines to compare")
    args = parser.parse_args()
    from fusionsearch.records import read_records

    ceilings = json.loads((args.folder / "ceilings.json").read_text())
    files = {p.name.split("-")[1]: p for p in args.folder.glob("sweep-*.jsonl*")}
    rows = [summarize(files[s], ceilings) for s in SHAPE_ORDER if s in files]
    first = next(read_records(files[SHAPE_ORDER[0]]))
    meta = {"gpu": first["gpu"]["name"], "torch": first["torch"], "cuda": first["cuda"],
            "template_hash": first["template_hash"]}
    comparisons = {}
    if args.remeasure:
        for shape in SHAPE_ORDER:
            again = sorted(args.remeasure.glob(f"sweep-{shape}-*.jsonl*"))
            if again and shape in files:
                comparisons[shape] = compare_remeasure(files[shape], again[0])
    baselines_again = {}
    if args.baselines_again:
        for shape in SHAPE_ORDER:
            again = sorted(args.baselines_again.glob(f"records-{shape}-fp16.jsonl*"))
            if again and shape in files:
                baselines_again[shape] = compare_remeasure(files[shape], again[0], kinds=("baseline",))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "ceilings": ceilings, "shapes": rows,
                                                         "remeasured": comparisons,
                                                         "baselines_again": baselines_again}, indent=1))
    text = markdown(rows, ceilings, meta, comparisons, baselines_again)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
