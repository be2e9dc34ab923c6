"""experiments/perf_report.py on the CPU: the plans it reads, the report it writes, its argument errors, the
baseline worker it shares across shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from experiment_scripts import load_experiment

from fusionsearch import records
from fusionsearch.mask import decode
from fusionsearch.plan import HAND_FUSED
from fusionsearch.sweep import ShapeSweep

ROOT = Path(__file__).resolve().parents[1]


def _layer(shape, dtype, ours, baselines, goal):
    stats = lambda m: {"median": m, "p20": m * 0.99, "p80": m * 1.01, "repeats": 7}  # noqa: E731
    best = min(baselines, key=baselines.get)
    return {"shape": shape, "dtype": dtype, "floor_us": 5.0, "goal_us": goal, "mask": 41108,
            "plan": decode(41108).describe(), "ours": stats(ours),
            "baselines": {n: stats(v) for n, v in baselines.items()}, "hard_fused": {},
            "best_baseline": best, "speedup": baselines[best] / ours, "floor_share": 5.0 / ours}


def latency(us: float) -> dict:
    return {"median": us, "p20": 0.99 * us, "p80": 1.01 * us, "mean": us, "min": 0.98 * us, "max": 1.02 * us,
            "repeats": 7}


class FakeGpu:
    """Stands in for the baseline worker pool, the sweeps and the ceilings; notes how each was used."""

    def __init__(self) -> None:
        self.pools: list = []
        self.sweeps: list[tuple] = []  # (shape, dtype, pool, how often the pool had been closed by then)
        self.interrupt_at: int | None = None  # the sweep, counted from 1, that Ctrl-C stops
        self.masks: list[list[int]] = []  # the plans each sweep timed

    def pool(self, devices):
        gpu = self

        class FakePool:
            def __init__(self) -> None:
                self.devices, self.closes = list(devices), 0
                gpu.pools.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.close()

            def close(self) -> None:
                self.closes += 1

            def environments(self) -> list[dict]:
                return [records.environment()]

        return FakePool()

    def sweep_shape(self, cfg, path, *, plans, segments, pool):
        self.sweeps.append((cfg.shape_text, cfg.dtype, pool, pool.closes))
        self.masks.append([plan.mask for plan in plans])
        if len(self.sweeps) == self.interrupt_at:
            raise KeyboardInterrupt
        found = [records.make_record(plan, cfg, "ok", latency_us=latency(50.0)) for plan in plans]
        found.append(records.make_record("sdpa_graph", cfg, "ok", latency_us=latency(100.0)))
        return ShapeSweep({"ok": len(plans)}, 0.0, {}, found)


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGpu()
    monkeypatch.setattr("fusionsearch.worker.WorkerPool", fake.pool)
    monkeypatch.setattr("fusionsearch.sweep.sweep_shape", fake.sweep_shape)
    monkeypatch.setattr("fusionsearch.baselines.measure_ceilings",
                        lambda dtype: {"peak_tflops": 750.0, "bandwidth_tbs": 3.0})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return fake


def run_report(tmp_path, *shapes, extra: tuple[str, ...] = ()) -> int:
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"shapes": [{"shape": s, "best": {"mask": 41108}} for s in shapes]}))
    return load_experiment("perf_report").main(["--out", str(tmp_path / "perf"), "--plans", str(plans), "--sweeps",
                                str(tmp_path / "no-sweeps"), "--shapes", *shapes, "--e2e-shapes", *extra])


def test_extra_masks_are_timed_at_every_shape_once_and_named_in_the_report(gpu, tmp_path):
    assert run_report(tmp_path, "1x32", "8x128", extra=("--dtypes", "fp16", "--extra-masks", "41179", "41108")) == 0
    hand_fused = len(HAND_FUSED)  # those plans come last
    candidates = [masks[:-hand_fused] for masks in gpu.masks]
    assert candidates == [[41108, 41179], [41108, 41179]]
    assert "plus plans 41179, 41108 at every shape" in (tmp_path / "perf.md").read_text()


def test_one_baseline_worker_serves_every_shape_and_dtype_and_is_closed_at_the_end(gpu, tmp_path):
    assert run_report(tmp_path, "1x32", "8x128") == 0
    (pool,) = gpu.pools
    assert pool.devices == ["cuda:0"] and pool.closes == 1
    assert [(shape, dtype) for shape, dtype, *_ in gpu.sweeps] == [
        ("1x32", "fp16"), ("8x128", "fp16"), ("1x32", "bf16"), ("8x128", "bf16")]
    assert all(used is pool and closes == 0 for *_, used, closes in gpu.sweeps)
    report = json.loads((tmp_path / "perf.json").read_text())
    assert [row["speedup"] for row in report["layers"]] == [2.0] * 4


def test_an_interrupted_report_closes_its_baseline_worker(gpu, tmp_path):
    gpu.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        run_report(tmp_path, "1x32", "8x128")
    (pool,) = gpu.pools
    assert pool.closes == 1 and len(gpu.sweeps) == 2
    assert not (tmp_path / "perf.json").exists()


def test_best_masks_name_a_canonical_plan_for_every_committed_shape():
    perf = load_experiment("perf_report")
    masks = perf.best_masks(ROOT / "experiments" / "results" / "sweeps-h100.json")
    assert sorted(masks, key=perf.SHAPE_ORDER.index) == perf.SHAPE_ORDER
    assert all(decode(m).canonical_id == m for m in masks.values())


def test_markdown_reports_speedups_goals_and_the_end_to_end_table():
    perf = load_experiment("perf_report")
    layers = [_layer("1x32", "fp16", 10.0, {"sdpa_graph": 40.0, "eager": 200.0}, 12),
              _layer("16x128", "fp16", 100.0, {"sdpa_graph": 90.0}, 55)]
    lat = lambda m: {"median": m, "p20": m, "p80": m}  # noqa: E731
    e2e = [{"shape": "1x128", "mask": 41108, "patched_layers": 12,
            "error_vs_fp32": {"patched": 1.4e-3, "hf_sdpa_fp16": 1.5e-3},
            "latency_us": {"hf_sdpa_graph": lat(740.0), "torch_compile_graph": lat(570.0), "fused_graph": lat(500.0)}}]
    report = {"meta": {"gpu": "GPU X", "torch": "t", "cuda": "c", "template_hash": "h", "time": "now"},
              "dtypes": ["fp16"], "ceilings": {"fp16": {"peak_tflops": 750.0, "bandwidth_tbs": 2.4}},
              "layers": layers, "e2e": e2e}
    text = perf.markdown(report)
    assert "4.00× (sdpa_graph)" in text and "0.90× (sdpa_graph)" in text
    assert f"{perf.geomean([4.0, 0.9]):.2f}×" in text and "Goals met at: 1x32." in text
    assert "| 1x128 | 500.0 (500.0–500.0) (41108) | 740.0" in text and "1.14×" in text


def test_markdown_names_both_copies_behind_the_bandwidth_ceiling():
    perf = load_experiment("perf_report")
    ceilings = {"peak_tflops": 770.0, "bandwidth_tbs": 4.0, "copy_us": 500.0, "memcpy_us": 800.0, "sm_copy_us": 500.0}
    report = {"meta": {"gpu": "GPU X", "torch": "t", "cuda": "c", "template_hash": "h", "time": "now"},
              "dtypes": ["fp16"], "ceilings": {"fp16": ceilings},
              "layers": [_layer("1x32", "fp16", 10.0, {"sdpa_graph": 40.0}, 12)], "e2e": []}
    assert "4.00 TB/s copy (the faster of a graph memcpy, 2.50, and an SM copy kernel, 4.00)" in perf.markdown(report)


def test_a_shape_without_a_recorded_best_plan_is_refused(tmp_path, capsys):
    perf = load_experiment("perf_report")
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"shapes": [{"shape": "1x32", "best": {"mask": 41108}}]}))
    with pytest.raises(SystemExit) as exit_info:
        perf.main(["--out", str(tmp_path / "perf"), "--plans", str(plans), "--shapes", "1x32", "--e2e-shapes", "2x64"])
    assert exit_info.value.code == 2
    assert "no best plan for 2x64" in capsys.readouterr().err


def test_candidates_hold_the_sweep_optimum_and_the_best_attention_kernel_plans():
    perf = load_experiment("perf_report")
    masks = perf.candidate_masks(ROOT / "experiments" / "data" / "sweeps" / "sweep-1x128-fp16.jsonl.gz", 2)
    best = perf.best_masks(ROOT / "experiments" / "results" / "sweeps-h100.json")["1x128"]
    assert masks[0] == best and len(masks) == len(set(masks)) <= 4
    with_attention = [m for m in masks if any(s.attention for s in decode(m).segments)]
    assert len(with_attention) == 2 and 41108 in with_attention  # 1×128's optimum does not use the kernel


def test_a_run_stopped_during_end_to_end_keeps_the_layer_tables(gpu, tmp_path):
    perf = load_experiment("perf_report")

    def stopped(shape, mask):
        raise KeyboardInterrupt

    perf.measure_e2e = stopped
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"shapes": [{"shape": "1x32", "best": {"mask": 41108}}]}))
    with pytest.raises(KeyboardInterrupt):
        perf.main(["--out", str(tmp_path / "perf"), "--plans", str(plans), "--sweeps", str(tmp_path / "none"),
                     "--shapes", "1x32", "--dtypes", "fp16", "--e2e-shapes", "1x32"])
    report = json.loads((tmp_path / "perf.json").read_text())
    assert [row["shape"] for row in report["layers"]] == ["1x32"] and report["e2e"] == []
    assert "| 1x32 |" in (tmp_path / "perf.md").read_text()
