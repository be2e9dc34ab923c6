"""Search strategies, the shared loop and the measurers, on SYNTHETIC replays (tests/synthetic_sweeps.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from experiment_scripts import load_experiment
from synthetic_sweeps import FIXTURES, sweep_records, write_sweep

from fusionsearch import records
from fusionsearch.config import LayerConfig
from fusionsearch.features import all_canonical_masks, segment_incidence
from fusionsearch.mask import decode
from fusionsearch.plan import Plan, Segment, all_segments
from fusionsearch.search import (GpuMeasurer, ReplayMeasurer, SearchError, SearchSpace, SegmentDPTuner, Trial,
                                 config_from_records, hand_fused_start, k_best_plans, load_records, make_tuner,
                                 run_search, shape_rows, trials_from_records)

CFG = LayerConfig(8, 128)
ENV = {"gpu": {"name": "SYNTHETIC test GPU", "capability": "0.0", "sm_count": 0}, "torch": "t", "cuda": "c",
       "template_hash": "synthetic"}


@pytest.fixture(scope="module")
def full_replay(tmp_path_factory) -> ReplayMeasurer:
    """A synthetic exhaustive sweep of 8x128: all 18,432 plans, the 150 segments alone, three baselines."""
    path = write_sweep(tmp_path_factory.mktemp("sweep") / "synthetic_8x128.jsonl", sweep_records(CFG))
    return ReplayMeasurer.from_file(path, CFG.batch, CFG.seq_len)


@pytest.fixture(scope="module")
def fixture_frame():
    return load_records(sorted(FIXTURES.glob("synthetic_sweep_*.jsonl.gz")))


def optimum(replay: ReplayMeasurer) -> float:
    return min(latency for status, latency in replay.plans.values() if status == "ok")


def small_replay(tmp_path: Path, outcomes: dict, segments: bool = False) -> ReplayMeasurer:
    """A replay written through records.RecordWriter: {mask: (status, latency)}."""
    path = tmp_path / "small.jsonl"
    with records.RecordWriter(path) as writer:
        for mask, (status, latency) in outcomes.items():
            stats = None if latency is None else {"median": latency, "p20": latency, "p80": latency, "mean": latency,
                                                  "min": latency, "max": latency, "repeats": 10}
            writer.write(records.make_record(decode(mask), CFG, status, latency_us=stats, env=ENV,
                                             message=None if status == "ok" else "test failure"))
    return ReplayMeasurer.from_file(path, CFG.batch, CFG.seq_len)


# --- the dynamic program -------------------------------------------------------------------------------------

def test_k_best_dp_equals_brute_force_over_every_plan():
    rng = np.random.default_rng(7)
    latency = {seg: float(rng.uniform(1, 10)) for seg in all_segments()}
    masks = all_canonical_masks()
    cost = segment_incidence(masks) @ np.array([latency[s] for s in all_segments()])
    expected = sorted(zip(cost.round(9), masks.tolist(), strict=True))[:25]
    found = k_best_plans(latency, 25)
    assert [(round(c, 9), p.canonical_id) for c, p in found] == expected


def test_dp_optimum_is_the_one_kernel_plans_when_every_kernel_costs_the_same():
    found = k_best_plans(dict.fromkeys(all_segments(), 1.0), 3)
    assert [c for c, _ in found] == [1.0, 1.0, 2.0]
    assert {p for _, p in found[:2]} == {Plan.from_cuts(set()), Plan.from_cuts(set(), attention=True)}


def test_dp_never_uses_a_failed_segment():
    latency = dict.fromkeys(all_segments(), 1.0)
    latency[Segment(0, 14)] = latency[Segment(0, 14, True)] = math.inf
    found = k_best_plans(latency, 50)
    assert found[0][0] == 2.0
    assert all(Segment(0, 14) not in p.segments and Segment(0, 14, True) not in p.segments for _, p in found)


def test_dp_with_the_attention_flag_enumerates_exactly_its_2048_plans():
    found = k_best_plans(dict.fromkeys(all_segments(), 1.0), 5000, attention=True)
    assert len(found) == 2048 and all(p.attention for _, p in found)


def test_segment_dp_measures_segments_first_then_the_dp_optimum(full_replay):
    space = SearchSpace(CFG, full_replay.candidates())
    tuner = SegmentDPTuner(space)
    result = run_search(tuner, full_replay, budget=len(all_segments()) + 32, batch_size=16)
    kinds = [t.kind for t in result.trials]
    assert kinds == ["segment"] * 150 + ["plan"] * 32
    latency = {s: (v if st == "ok" else math.inf) for s, (st, v) in full_replay.segments.items()}
    assert result.plan_trials[0].mask == k_best_plans(latency, 1)[0][1].canonical_id
    assert result.best.latency_us <= 1.05 * optimum(full_replay)


def test_segment_dp_with_a_budget_below_the_segment_count_measures_no_plan(full_replay):
    result = run_search(SegmentDPTuner(SearchSpace(CFG, full_replay.candidates())), full_replay, budget=100)
    assert len(result.trials) == 100 and result.plan_trials == [] and result.best is None


# --- xgb against random ----------------------------------------------------------------------------------------

def test_xgb_finds_the_optimum_far_faster_than_random(full_replay):
    space = SearchSpace(CFG, full_replay.candidates())
    best = optimum(full_replay)
    within = sum(st == "ok" and v <= 1.02 * best for st, v in full_replay.plans.values())
    random_expected = len(space) / (within + 1)  # mean trials for random sampling to hit one of them
    for seed in range(3):
        xgb = run_search(make_tuner("xgb", space, seed), full_replay, budget=200, batch_size=16)
        ratio = xgb.best_so_far() / best
        assert ratio[-1] <= 1.01, f"seed {seed}: xgb ended {ratio[-1]:.3f}× the optimum"
        reached = int(np.argmax(ratio <= 1.02)) + 1
        assert reached * 10 <= random_expected, f"seed {seed}: xgb needed {reached} trials"
        rand = run_search(make_tuner("random", space, seed), full_replay, budget=200, batch_size=16)
        assert rand.best_so_far()[-1] / best > 1.02, f"seed {seed}: random got lucky; widen the margin"


def test_warm_started_xgb_picks_fast_plans_before_measuring_any(fixture_frame):
    replay = ReplayMeasurer(fixture_frame, CFG)
    space = SearchSpace(CFG, replay.candidates())
    median = np.median([v for st, v in replay.plans.values() if st == "ok"])
    others = fixture_frame.drop(index=shape_rows(fixture_frame, CFG).index)
    for seed in range(2):
        warm = run_search(make_tuner("xgb", space, seed, warm=others), replay, budget=16, batch_size=16)
        cold = run_search(make_tuner("xgb", space, seed), replay, budget=16, batch_size=16)
        assert warm.strategy == "xgb_warm"
        warm_median = np.median([t.latency_us for t in warm.trials if t.ok])
        cold_median = np.median([t.latency_us for t in cold.trials if t.ok])
        assert warm_median < 0.9 * median < cold_median


def test_hand_fused_start_measures_those_plans_first_and_never_ends_slower(full_replay):
    space = SearchSpace(CFG, full_replay.candidates())
    hand = hand_fused_start()
    best_hand = min(latency for mask in hand for status, latency in [full_replay.plans[mask]] if status == "ok")
    for seed in range(2):
        tuner = make_tuner("xgb", space, seed, start=hand)
        trials = run_search(tuner, full_replay, budget=16, batch_size=16).trials
        assert [t.mask for t in trials[:len(hand)]] == hand
        assert len({t.mask for t in trials}) == 16  # the rest of the batch is random, no repeats
        assert min(t.latency_us for t in trials if t.ok) <= best_hand
    default = run_search(make_tuner("xgb", space, 0), full_replay, budget=16, batch_size=16).trials
    assert not set(hand) <= {t.mask for t in default}  # by default the first batch is all random


def test_start_plans_a_partial_replay_lacks_are_skipped(tmp_path):
    masks = [int(m) for m in all_canonical_masks()[:6]]
    replay = small_replay(tmp_path, {m: ("ok", 10.0 + i) for i, m in enumerate(masks)})
    space = SearchSpace(CFG, replay.candidates())
    assert not any(mask in space for mask in hand_fused_start())
    trials = run_search(make_tuner("xgb", space, 0, start=hand_fused_start()), replay, budget=6, batch_size=6).trials
    assert sorted(t.mask for t in trials) == sorted(masks)


def test_xgb_measures_both_sides_of_the_attention_flag_in_every_batch(full_replay):
    space = SearchSpace(CFG, full_replay.candidates())
    uses_kernel = lambda mask: bool(mask >> 15 & 1)  # noqa: E731
    for seed in range(2):
        trials = run_search(make_tuner("xgb", space, seed), full_replay, budget=64, batch_size=16).trials
        batches = [[uses_kernel(t.mask) for t in trials[i:i + 16]] for i in range(0, 64, 16)]
        assert sum(batches[0]) == 8  # the cold batch: half of its random plans from each side
        assert all(any(b) and not all(b) for b in batches), batches
        assert len({t.mask for t in trials}) == 64
    one_side = run_search(make_tuner("xgb", space, 0, cover_attention=False), full_replay, budget=16,
                          batch_size=16).trials
    assert sum(uses_kernel(t.mask) for t in one_side) < 8  # without covering the first batch is plain random


def test_xgb_fills_a_batch_from_one_side_of_the_flag_where_the_other_has_no_plans(tmp_path):
    masks = [int(m) for m in all_canonical_masks() if not m >> 15 & 1][:6]
    replay = small_replay(tmp_path, {m: ("ok", 10.0 + i) for i, m in enumerate(masks)})
    space = SearchSpace(CFG, replay.candidates())
    trials = run_search(make_tuner("xgb", space, 0), replay, budget=6, batch_size=4).trials
    assert sorted(t.mask for t in trials) == sorted(masks)


@pytest.mark.parametrize("strategy", ["xgb", "random"])
def test_search_is_deterministic_for_a_seed(full_replay, strategy):
    space = SearchSpace(CFG, full_replay.candidates())
    runs = [run_search(make_tuner(strategy, space, seed), full_replay, budget=48, batch_size=16).trials
            for seed in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert [t.mask for t in runs[0]] != [t.mask for t in runs[2]]


# --- the loop and the replay -------------------------------------------------------------------------------------

def test_replay_answers_recorded_failures_and_failures_are_never_best(tmp_path):
    fast, mid, slow, broken = (Plan.from_cuts(c).mask for c in ({1}, {2}, {3}, {4}))
    replay = small_replay(tmp_path, {fast: ("timeout", None), mid: ("ok", 20.0), slow: ("ok", 30.0),
                                     broken: ("compile_error", None)})
    assert replay.measure([fast, broken, mid]) == [("timeout", None), ("compile_error", None), ("ok", 20.0)]
    result = run_search(make_tuner("exhaustive", SearchSpace(CFG, replay.candidates())), replay, budget=10)
    assert result.stopped == "exhausted"
    assert len(result.trials) == 4 and result.failures == 2
    assert result.best.mask == mid and result.best.latency_us == 20.0


def test_replay_reads_a_plan_with_ok_and_failed_records_as_its_ok_median(tmp_path):
    mask = Plan.from_cuts({5}).mask
    path = tmp_path / "repeat.jsonl"
    with records.RecordWriter(path) as writer:
        for status, latency in (("ok", 10.0), ("runtime_error", None), ("ok", 14.0)):
            stats = latency and {f: latency for f in records.LATENCY_FIELDS}
            writer.write(records.make_record(decode(mask), CFG, status, latency_us=stats, env=ENV))
    replay = ReplayMeasurer.from_file(path, CFG.batch, CFG.seq_len)
    assert replay.measure([mask]) == [("ok", 12.0)]
    assert [(t.mask, t.status, t.latency_us) for t in trials_from_records(load_records(path), CFG)] == [
        (mask, "ok", 12.0)]


def test_budget_counts_every_trial_and_prior_trials_are_not_measured_again(tmp_path):
    masks = [Plan.from_cuts({b}).mask for b in range(1, 8)]
    replay = small_replay(tmp_path, {m: ("ok", 10.0 + i) for i, m in enumerate(masks)})
    prior = [Trial(0, "ok", 99.0, mask=masks[0]), Trial(1, "timeout", None, mask=masks[1])]
    result = run_search(make_tuner("random", SearchSpace(CFG, replay.candidates()), 0), replay, budget=5,
                        batch_size=2, prior=prior)
    assert len(result.trials) == 5 and result.trials[:2] == prior
    assert not {t.mask for t in result.trials[2:]} & {masks[0], masks[1]}


def test_search_stops_after_patience_batches_without_improvement(tmp_path):
    masks = sorted(Plan.from_cuts({b}).mask for b in range(1, 14))
    # Exhaustive goes in ascending id, so the first batch holds the fastest plan and nothing later improves.
    replay = small_replay(tmp_path, {m: ("ok", 10.0 + i) for i, m in enumerate(masks)})
    result = run_search(make_tuner("exhaustive", SearchSpace(CFG, replay.candidates())), replay, budget=13,
                        batch_size=2, patience=3)
    assert result.stopped == "early_stop" and len(result.trials) == 8
    assert result.best.mask == masks[0]


def test_replay_without_segment_records_refuses_segment_dp_with_the_fix(tmp_path):
    replay = small_replay(tmp_path, {Plan.from_cuts({1}).mask: ("ok", 1.0)})
    with pytest.raises(SearchError, match="kind=segment record"):
        run_search(make_tuner("segment-dp", SearchSpace(CFG, replay.candidates())), replay, budget=10)


def test_replay_of_a_shape_the_file_lacks_names_what_it_holds(fixture_frame):
    with pytest.raises(SearchError, match="holds 1x128 fp16, 64x512 fp16, 8x128 fp16"):
        config_from_records(fixture_frame, 16, 128)


def test_replay_reports_its_baselines(full_replay):
    baselines = full_replay.baselines()
    assert set(baselines) == {"eager", "sdpa_graph", "compile_graph"}
    assert min(baselines.values()) > optimum(full_replay)


@pytest.mark.parametrize("call, message", [
    (lambda space: make_tuner("annealing", space), "annealing.*random, exhaustive, segment_dp, xgb"),
    (lambda space: make_tuner("random", space, warm=object()), "warm-start"),
    (lambda space: make_tuner("xgb", space, epsilon=2.0), "epsilon 2.0"),
])
def test_bad_strategy_requests_are_refused_with_the_fix(call, message):
    with pytest.raises(SearchError, match=message):
        call(SearchSpace(CFG))


def test_zero_budget_is_refused(tmp_path):
    replay = small_replay(tmp_path, {Plan.from_cuts({1}).mask: ("ok", 1.0)})
    with pytest.raises(SearchError, match="budget 0"):
        run_search(make_tuner("random", SearchSpace(CFG, replay.candidates())), replay, budget=0)


# --- the GPU measurer, with bench faked ------------------------------------------------------------------------

def test_gpu_measurer_sends_plans_to_bench_and_reads_statuses(monkeypatch, tmp_path):
    from fusionsearch import bench

    calls = []

    def fake_measure_plans(cfg, plans, path, **kw):
        calls.append((cfg, plans, path, kw))
        return [records.make_record(plans[0], cfg, "ok", latency_us=dict.fromkeys(records.LATENCY_FIELDS, 7.5),
                                    env=ENV),
                records.make_record(plans[1], cfg, "wrong_answer", env=ENV)]

    monkeypatch.setattr(bench, "measure_plans", fake_measure_plans)
    measurer = GpuMeasurer(CFG, tmp_path / "records.jsonl", resume=False)
    measurer._pool = pool = object()  # no workers: bench is faked
    masks = [Plan.from_cuts({1}).mask, Plan.from_cuts({2}).mask]
    assert measurer.measure(masks) == [("ok", 7.5), ("wrong_answer", None)]
    (cfg, plans, path, kw), = calls
    assert cfg == CFG and [p.mask for p in plans] == masks and path == tmp_path / "records.jsonl"
    assert kw["pool"] is pool and kw["progress"] is False and kw["resume"] is False


# --- experiments/evaluate_search.py ----------------------------------------------------------------------------

def test_kendall_tau_b_matches_its_pairwise_definition_with_ties():
    evaluate = load_experiment("evaluate_search")
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)
    pairs = [(i, j) for i in range(40) for j in range(i + 1, 40)]
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    untied_x = sum(x[i] != x[j] for i, j in pairs)
    untied_y = sum(y[i] != y[j] for i, j in pairs)
    assert evaluate.kendall_tau(x, y, chunk=7) == pytest.approx(s / math.sqrt(untied_x * untied_y))
    assert evaluate.kendall_tau(x, x) == pytest.approx(1.0)


def test_evaluation_runs_end_to_end_on_the_synthetic_fixtures_and_says_so(tmp_path, capsys):
    evaluate = load_experiment("evaluate_search")
    sweeps = sorted(FIXTURES.glob("synthetic_sweep_*.jsonl.gz"))
    code = evaluate.main([*map(str, sweeps), "--out", str(tmp_path), "--seeds", "2", "--budget", "130", "--batch-size", "32",
                          "--strategies", "random,segment-dp,xgb,xgb_warm"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    markdown = (tmp_path / "summary.md").read_text()
    assert summary["synthetic"] is True and markdown.startswith("**SYNTHETIC DATA")
    assert [s["shape"] for s in summary["shapes"]] == ["1x128", "8x128", "64x512"]
    for shape in summary["shapes"]:
        assert (tmp_path / shape["plot"]).is_file()
        assert set(shape["strategies"]) == {"random", "segment_dp", "xgb", "xgb_warm"}
        assert all(len(v) == 2 for v in shape["strategies"]["xgb"]["trials_to_within"].values())
        assert -1.0 <= shape["zero_shot"]["kendall_tau"] <= 1.0 and shape["zero_shot"]["top1_true_rank"] >= 1


def test_gpu_measurer_measures_segments_and_baselines_through_bench(monkeypatch, tmp_path):
    from fusionsearch import bench

    def fake_run_sweep(cfg, items, path, **kw):
        return [records.make_record(item, cfg, "ok" if item.first else "compile_error",
                                    latency_us=dict.fromkeys(records.LATENCY_FIELDS, 3.0) if item.first else None,
                                    env=ENV) for item in items]

    def fake_measure_baselines(cfg, names, path, **kw):
        assert names is None  # bench picks the baselines that can run on the device
        return [records.make_record("sdpa_graph", cfg, "ok", latency_us=dict.fromkeys(records.LATENCY_FIELDS, 9.0),
                                    env=ENV),
                records.make_record("compile", cfg, "runtime_error", env=ENV)]

    monkeypatch.setattr(bench, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(bench, "measure_baselines", fake_measure_baselines)
    measurer = GpuMeasurer(CFG, tmp_path / "records.jsonl")
    measurer._pool = object()
    assert measurer.measure_segments([Segment(0, 0), Segment(1, 3)]) == [("compile_error", None), ("ok", 3.0)]
    assert measurer.baselines() == {"sdpa_graph": 9.0}
