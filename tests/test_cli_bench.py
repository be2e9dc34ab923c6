"""`fusionsearch bench` on the CPU: which path each request takes (the in-process exhaustive sweep for --all, isolated
workers for --masks), what reaches the sweep functions, the final summary, and the errors. The GPU-side functions
are replaced by fakes that append records the way the real ones do."""
from __future__ import annotations

import json

import pytest
import torch

from fusionsearch import bench, records, sweep
from fusionsearch.cli import bench as bench_cli
from fusionsearch.cli import main
from fusionsearch.config import LayerConfig
from fusionsearch.mask import decode
from fusionsearch.plan import Plan, all_segments, enumerate_plans

CFG = LayerConfig(batch=8, seq_len=128)
MEASURED_PLANS = 15  # more than a table shows per kind, so the summary must trim
BASELINE_US = {"eager": 400.0, "sdpa_graph": 250.0}


def latency(us: float) -> dict:
    return {"median": us, "p20": 0.99 * us, "p80": 1.01 * us, "mean": us, "min": 0.98 * us, "max": 1.02 * us,
            "repeats": 7}


def plan_us(index: int) -> float:
    return 300.0 - 10.0 * index  # the last measured plan is the fastest


class FakeGpu:
    """Stands in for everything that needs CUDA and records how it was called."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.calls: dict[str, list] = {}
        self.crash_at = crash_at

    def note(self, name: str, *args, **kw) -> None:
        self.calls.setdefault(name, []).append((args, kw))

    def sweep_plans(self, cfg, plans, path, *, seed=0, resume=True):
        plans = list(plans)
        self.note("sweep_plans", cfg, plans, path, seed=seed, resume=resume)
        if resume and records.final_records(path):
            return {"skipped": len(plans)}
        with records.RecordWriter(path) as writer:
            for index, plan in enumerate(plans[:MEASURED_PLANS]):
                writer.started(plan, cfg)
                if index == self.crash_at:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
                status = "wrong_answer" if index == 0 else "ok"
                writer.write(records.make_record(plan, cfg, status, error={"rel": 1e-3, "torch_rel": 1e-3},
                                                 latency_us=latency(plan_us(index)) if status == "ok" else None))
        return {"skipped": 0, "ok": MEASURED_PLANS - 1, "wrong_answer": 1}

    def sweep_segments(self, cfg, path, *, seed=0, resume=True):
        self.note("sweep_segments", cfg, path, seed=seed, resume=resume)
        with records.RecordWriter(path) as writer:
            for segment in all_segments()[:3]:
                writer.write(records.make_record(segment, cfg, "ok", latency_us=latency(20.0)))
        return {"skipped": 0, "ok": 3}

    def measure_baselines(self, cfg, names, path, **kw):
        self.note("measure_baselines", cfg, names, path, **kw)
        return [records.make_record(name, cfg, "ok", latency_us=latency(BASELINE_US[name]))
                for name in (names or BASELINE_US)]

    def measure_ceilings(self, cfg, **kw):
        self.note("measure_ceilings", cfg, **kw)
        return {"peak_tflops": 800.0, "bandwidth_tbs": 3.0}

    def run_sweep(self, cfg, items, path, **kw):
        self.note("run_sweep", cfg, list(items), path, **kw)
        return [records.make_record(item if isinstance(item, str) else decode(item), cfg, "ok",
                                    latency_us=latency(100.0 if isinstance(item, str) else 50.0)) for item in items]


class FakePool:
    def __init__(self, devices) -> None:
        self.devices = list(devices)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGpu()
    monkeypatch.setattr(bench, "cuda_devices", lambda gpus=None: [f"cuda:{i}" for i in (gpus or [0])])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: fake.note("set_device", device))
    monkeypatch.setattr("fusionsearch.worker.WorkerPool", FakePool)
    for name in ("measure_baselines", "measure_ceilings", "run_sweep"):
        monkeypatch.setattr(bench, name, getattr(fake, name))
    for name in ("sweep_plans", "sweep_segments"):
        monkeypatch.setattr(sweep, name, getattr(fake, name))
    return fake


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["bench", "--shape", "8x128", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def call(fake: FakeGpu, name: str) -> tuple[tuple, dict]:
    assert len(fake.calls.get(name, [])) == 1, f"{name} calls: {fake.calls.get(name)}"
    return fake.calls[name][0]


# ---------------------------------------------------------------- --all: the in-process sweep

def test_all_sweeps_every_plan_and_segment_in_process_then_the_default_baselines(gpu, capsys, tmp_path):
    path = tmp_path / "r.jsonl"
    code, out, err = run_cli(capsys, "--all", "--records", path)
    assert code == 0, err
    (cfg, plans, plan_path), kw = call(gpu, "sweep_plans")
    assert cfg == CFG and plan_path == path and len(plans) == 18_432 and len(set(plans)) == 18_432
    assert call(gpu, "sweep_segments")[0] == (CFG, path)
    (_, names, _), kw = call(gpu, "measure_baselines")
    assert names is None and kw["devices"] == ["cuda:0"]  # None: the default set, on the sweep's GPU
    assert gpu.calls["set_device"] == [(("cuda:0",), {})]
    assert "run_sweep" not in gpu.calls  # no plan went through the worker path


def test_all_prints_the_best_plan_and_its_speedup_over_the_best_baseline(gpu, capsys, tmp_path):
    code, out, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl")
    assert code == 0, err
    plans = list(enumerate_plans())
    best_key, best_us = records.key_of(plans[MEASURED_PLANS - 1]), plan_us(MEASURED_PLANS - 1)
    speedup = BASELINE_US["sdpa_graph"] / best_us
    assert (f"8x128 fp16: best {best_key} {best_us:.1f} µs vs best baseline sdpa_graph 250.0 µs: "
            f"{speedup:.2f}× speed-up, floor") in out
    assert "plans: 14 ok, 1 wrong_answer; segments: 3 ok; baselines: 2 ok" in out
    assert f"… {MEASURED_PLANS - 1 - bench_cli.SHOWN_PER_GROUP} more results in the records file" in out
    assert out.count("plan:") == bench_cli.SHOWN_PER_GROUP + 1 + 1  # fastest rows, the failure, the summary


def test_all_json_report_holds_the_best_plan_counts_and_trimmed_results(gpu, capsys, tmp_path):
    code, out, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["best_us"] == plan_us(MEASURED_PLANS - 1) and report["best_baseline"] == "sdpa_graph"
    assert report["speedup"] == pytest.approx(250.0 / report["best_us"])
    assert report["counts"] == {"plan": {"ok": 14, "wrong_answer": 1}, "segment": {"ok": 3},
                                "baseline": {"ok": 2}}
    shown = [r for r in report["results"] if r["kind"] == "plan" and r["status"] == "ok"]
    assert [r["latency_us"]["median"] for r in shown] == sorted(plan_us(i) for i in range(1, MEASURED_PLANS))[:10]
    assert report["omitted"] == MEASURED_PLANS - 1 - bench_cli.SHOWN_PER_GROUP
    assert report["floor_us"] > 0


@pytest.mark.parametrize("flag, resume", [([], False), (["--resume"], True)])
def test_resume_flag_reaches_plans_segments_and_baselines(gpu, capsys, tmp_path, flag, resume):
    code, _, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl", *flag)
    assert code == 0, err
    assert call(gpu, "sweep_plans")[1]["resume"] is resume
    assert call(gpu, "sweep_segments")[1]["resume"] is resume
    assert call(gpu, "measure_baselines")[1]["resume"] is resume


def test_a_resumed_sweep_that_measures_nothing_still_reports_the_records(gpu, capsys, tmp_path):
    path = tmp_path / "r.jsonl"
    first = json.loads(run_cli(capsys, "--all", "--records", path, "--format", "json")[1])
    code, out, err = run_cli(capsys, "--all", "--records", path, "--format", "json", "--resume")
    assert code == 0, err
    again = json.loads(out)
    assert gpu.calls["sweep_plans"][1][1]["resume"] is True
    assert (again["best"], again["best_us"], again["counts"]) == (first["best"], first["best_us"], first["counts"])


def test_all_honours_named_baselines_one_gpu_and_no_floor(gpu, capsys, tmp_path):
    code, out, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl", "--baselines", "eager",
                             "--gpus", "1", "--no-floor", "--run-timeout", "30")
    assert code == 0, err
    (_, names, _), kw = call(gpu, "measure_baselines")
    assert names == ["eager"] and kw["devices"] == ["cuda:1"] and kw["run_timeout_s"] == 30.0
    assert gpu.calls["set_device"] == [(("cuda:1",), {})]
    assert "measure_ceilings" not in gpu.calls and "floor" not in out


def test_all_measures_the_ceilings_on_the_sweeps_gpu(gpu, capsys, tmp_path):
    code, _, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl", "--gpus", "2")
    assert code == 0, err
    assert call(gpu, "measure_ceilings")[1] == {"gpus": [2]}


def test_a_kernel_crash_names_the_plan_and_how_to_continue(capsys, tmp_path, monkeypatch, gpu):
    gpu.crash_at = 4
    code, out, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl")
    crashed = list(enumerate_plans())[4].canonical_id
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"stopped at plan:{crashed} (CUDA error: an illegal memory access was encountered)" in err
    assert f"--masks {crashed} in place of --all" in err and "--all --resume" in err
    assert "measure_baselines" not in gpu.calls


def test_a_crash_outside_a_measurement_is_not_blamed_on_an_earlier_run(capsys, tmp_path, monkeypatch, gpu):
    path = tmp_path / "r.jsonl"
    with records.RecordWriter(path) as writer:  # an earlier run was killed during this plan
        writer.started(Plan.from_cuts(set(range(1, 15))), CFG)

    def broken_library(*args, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sweep, "sweep_plans", broken_library)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["bench", "--shape", "8x128", "--all", "--records", str(path)])


# ---------------------------------------------------------------- --masks: isolated workers

def test_masks_stay_on_the_worker_path(gpu, capsys, tmp_path):
    code, out, err = run_cli(capsys, "--masks", "6826", "--baselines", "eager", "--records", tmp_path / "r.jsonl",
                             "--flush-l2", "--gpus", "0", "1")
    assert code == 0, err
    (_, items, _), kw = call(gpu, "run_sweep")
    assert items == [6826, "eager"] and kw["flush_l2"] is True and kw["pool"].devices == ["cuda:0", "cuda:1"]
    assert not {"sweep_plans", "sweep_segments", "measure_baselines"} & set(gpu.calls)
    assert "2.00× speed-up" in out


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["--all", "--gpus", "0", "1"], "--all sweeps in one process on one GPU, but --gpus names 2 (0 1); give one "
                                    "index, e.g. --gpus 0"),
    (["--all", "--flush-l2"], "drop --flush-l2, or use --masks"),
    (["--all", "--baselines", "eagre"], "baseline 'eagre' does not exist; choose from eager"),
    (["--all", "--compile-timeout", "0"], "--compile-timeout 0 is not above 0 seconds"),
    (["--masks", "6826", "--run-timeout", "-5"], "--run-timeout -5 is not above 0 seconds"),
    (["--masks", "70000"], "out of range"),
    ([], "nothing to measure; give --masks M …, --all, --segments and/or --baselines"),
])
def test_bad_input_exits_2_with_one_line_and_measures_nothing(gpu, capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv, "--records", tmp_path / "r.jsonl")
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1
    assert not gpu.calls
    assert not (tmp_path / "r.jsonl").exists()


def test_a_bad_shape_exits_2(gpu, capsys):
    code = main(["bench", "--shape", "8by128", "--all"])
    assert code == 2 and "not of the form BxS" in capsys.readouterr().err and not gpu.calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_all_without_a_gpu_exits_2_before_sweeping(capsys, tmp_path, monkeypatch):
    fake = FakeGpu()
    monkeypatch.setattr(sweep, "sweep_plans", fake.sweep_plans)
    code, out, err = run_cli(capsys, "--all", "--records", tmp_path / "r.jsonl")
    assert code == 2 and out == "" and "needs a CUDA GPU" in err and err.count("\n") == 1
    assert not fake.calls


# ---------------------------------------------------------------- the shared library function

def test_sweep_shape_with_no_baselines_measures_none_and_reports_each_plan_once(gpu, tmp_path):
    path = tmp_path / "r.jsonl"
    plans = list(enumerate_plans())[:3]
    done = sweep.sweep_shape(CFG, path, plans=plans + plans[:1], baselines=[], device="cuda:0")
    assert "measure_baselines" not in gpu.calls
    assert [r["key"] for r in done.found] == [records.key_of(p) for p in plans] + \
        [records.key_of(s) for s in all_segments()[:3]]
    assert done.segment_counts == {"skipped": 0, "ok": 3} and done.plan_seconds >= 0


def test_sweep_shape_can_leave_the_segments_out(gpu, tmp_path):
    plans = list(enumerate_plans())[:2]
    done = sweep.sweep_shape(CFG, tmp_path / "r.jsonl", plans=plans, baselines=[], device="cuda:0", segments=False)
    assert [r["key"] for r in done.found] == [records.key_of(p) for p in plans]
    assert done.segment_counts == {}
