"""experiments/summarize_sweeps.py on the committed records: the baselines of a later run compared with a sweep's."""
from __future__ import annotations

from pathlib import Path

from experiment_scripts import load_experiment

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "data" / "sweeps" / "sweep-1x32-fp16.jsonl.gz"
LATER = ROOT / "experiments" / "data" / "perf-h100" / "records-1x32-fp16.jsonl.gz"


def test_baselines_of_a_later_run_are_paired_and_compared_by_name():
    summarize = load_experiment("summarize_sweeps")
    comparison = summarize.compare_remeasure(SWEEP, LATER, kinds=("baseline",))
    assert set(comparison) == {"run", "sweep_run", "baseline"}  # plans ran on other kernels: not compared
    pairs = comparison["baseline"]["pairs"]
    assert {"sdpa_graph", "eager_graph", "hf_bert_graph"} <= set(pairs)
    assert comparison["baseline"]["count"] == len(pairs)
    assert all(before > 0 and after > 0 for before, after in pairs.values())
    assert summarize._graph_deviation(comparison).startswith("3 within ")


def test_a_shape_without_graph_baselines_says_none():
    summarize = load_experiment("summarize_sweeps")
    assert summarize._graph_deviation({"baseline": {"pairs": {"eager": (200.0, 210.0)}}}) == "none"
