"""Workers and sweeps on the CPU: every planted fault ends as its status, the next request still succeeds,
no finished result is lost, and a killed sweep resumes without duplicates."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fusionsearch
from fusionsearch import bench, records
from fusionsearch.config import LayerConfig
from fusionsearch.mask import decode
from fusionsearch.plan import enumerate_plans
from fusionsearch.reference import reference_forward
from fusionsearch.worker import Request, WorkerPool, resolve

CFG = LayerConfig(batch=2, seq_len=8, heads=2, head_size=32, ffn=64, dtype="fp32")
HERE = str(Path(__file__).resolve())
FAST_TIMING = {"warmup": 1, "min_repeats": 3, "max_repeats": 3, "target_ms": 1.0}
ROOT = str(Path(fusionsearch.__file__).resolve().parent.parent)


# ---------------------------------------------------------------- planted builders (run inside the worker)

def planted_ok(request, cfg, weights, inputs):
    return lambda: reference_forward(inputs.x, inputs.attention_mask, weights, cfg, compute_dtype=inputs.x.dtype)


def planted_slow_ok(request, cfg, weights, inputs):
    time.sleep(0.2)
    return planted_ok(request, cfg, weights, inputs)


def planted_hang_in_build(request, cfg, weights, inputs):
    time.sleep(3600)


def planted_hang_in_run(request, cfg, weights, inputs):
    return lambda: time.sleep(3600)


def planted_raise(request, cfg, weights, inputs):
    def run():
        raise RuntimeError("planted fault in the kernel launch")
    return run


class BuildError(Exception):
    """Stands in for fusionsearch.build.BuildError: classified by name, so a compile failure is compile_error."""


def planted_compile_error(request, cfg, weights, inputs):
    raise BuildError("nvcc: planted error in seg_00_01.cu line 3")


def planted_exit(request, cfg, weights, inputs):
    def run():
        os._exit(7)
    return run


def planted_segfault(request, cfg, weights, inputs):
    def run():
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a bad pointer does
    return run


def planted_wrong(request, cfg, weights, inputs):
    # Drops the second FFN bias: a subtle, finite, plausible-looking wrong answer.
    from fusionsearch.weights import LayerWeights

    broken = LayerWeights(**{**weights.tensors(), "b_ffn2": weights.b_ffn2 * 0, "eps": weights.eps})
    return lambda: reference_forward(inputs.x, inputs.attention_mask, broken, cfg, compute_dtype=inputs.x.dtype)


def planted_stale_rows(request, cfg, weights, inputs):
    # Reuses one output buffer and, after the first call, forgets to write its last token: NaN poisoning catches it.
    state = {}

    def run():
        out = reference_forward(inputs.x, inputs.attention_mask, weights, cfg, compute_dtype=inputs.x.dtype)
        if "buffer" not in state:
            state["buffer"] = out.clone()
        else:
            state["buffer"][:, :-1] = out[:, :-1]
        return state["buffer"]
    return run


def planted_execute_then_poisoned(request, ctx):
    # A finished result followed by a poisoned context: the worker exits right after sending it.
    ctx.cuda_healthy = lambda: False
    return {"status": "ok", "latency_us": {"median": 1.0, "p20": 1.0, "p80": 1.0, "mean": 1.0, "min": 1.0,
                                           "max": 1.0, "repeats": 1}}


class FakeLibrary:
    """Runs each 'kernel' (segment) with the reference operators on the buffers, counting launches."""

    def __init__(self, segments):
        self.segments = list(segments)
        self.launches = []

    def index(self, segment):
        return self.segments.index(segment)

    def run(self, kernel_ids, tensors, batch, seq_len, eps, scale):
        from fusionsearch.ops import OPS
        from fusionsearch.reference import run_ops

        cfg = self.cfg.with_shape(batch, seq_len)
        self.calls = getattr(self, "calls", 0) + 1
        if getattr(self, "lazy", False) and self.calls > 1:
            kernel_ids = kernel_ids[1:]
        for kernel in kernel_ids:
            self.launches.append(kernel)
            seg = self.segments[kernel]
            env = {name: t for name, t in tensors.items() if name not in ("x", "out", "key_bias")}
            env["x"] = tensors["x"].reshape(cfg.tokens, cfg.hidden)
            env["attention_mask"] = None if "key_bias" not in tensors else (tensors["key_bias"] == 0).long()
            result = run_ops(seg.first, seg.last, env, self.weights, cfg)[OPS[seg.last].output]
            tensors[OPS[seg.last].output].copy_(result.reshape(tensors[OPS[seg.last].output].shape))


class FakeLayer:
    """The hooks worker.py uses on runtime.FusedEncoderLayer, on the CPU: run_into, tensors_for, library."""

    def __init__(self, plan, weights, cfg):
        from fusionsearch.ops import OPS, tensor_shape

        self.plan, self.cfg, self.weights = plan, cfg, weights
        self.library = FakeLibrary(plan.segments)
        self.library.cfg, self.library.weights = cfg, weights
        self.workspace = {op.output: torch.empty(tensor_shape(op.output, cfg)) for op in OPS if op.output != "out"}

    def poison_workspace(self, batch, seq_len):
        for tensor in self.workspace.values():
            tensor.fill_(float("nan"))

    def tensors_for(self, x, bias, out):
        tensors = {**self.workspace, "x": x, "out": out}
        if bias is not None:
            tensors["key_bias"] = bias
        return tensors

    def run_into(self, x, attention_mask, out):
        from fusionsearch.runtime import key_bias

        tensors = self.tensors_for(x, key_bias(attention_mask), out)
        self.library.run(list(range(len(self.plan.segments))), tensors, self.cfg.batch, self.cfg.seq_len,
                         self.cfg.eps, 0.0)
        return out


def planted_fake_plan(request, cfg, weights, inputs, lazy=False):
    from fusionsearch.worker import _layer_target

    layer = FakeLayer(decode(request.mask), weights, cfg)
    layer.library.lazy = lazy
    built = _layer_target(layer, cfg, inputs, list(layer.plan.segments))
    built.layer = layer
    return built


def planted_fake_plan_lazy(request, cfg, weights, inputs):
    # After its first call the first kernel writes nothing: later kernels read stale or poisoned buffers.
    return planted_fake_plan(request, cfg, weights, inputs, lazy=True)


# ---------------------------------------------------------------- helpers

def request(name, key=None, *, compile_timeout_s=60.0, run_timeout_s=60.0, **kw):
    return Request(kind="plan", key=key or f"plan:{name}", cfg=CFG.to_dict(), mask=0, seed=1,
                   compile_timeout_s=compile_timeout_s, run_timeout_s=run_timeout_s, timing=FAST_TIMING,
                   builder=f"{HERE}:{name}", **kw)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(["cpu"]) as shared:
        shared.environments()
        yield shared


def fault_then_ok(pool, fault):
    results = {req.key: res for req, res, _ in pool.run([fault, request("planted_ok", "plan:after")])}
    assert set(results) == {fault.key, "plan:after"}
    after = results["plan:after"]
    assert after["status"] == "ok", after["message"]
    assert after["latency_us"]["repeats"] == 3 and after["error"]["rel"] < 1e-5
    return results[fault.key]


# ---------------------------------------------------------------- fault paths

def test_correct_builder_is_verified_and_timed(pool):
    result, env = pool.call(request("planted_ok"))
    assert result["status"] == "ok" and result["error"]["rel"] < 1e-5 and result["latency_us"]["median"] > 0
    assert env["gpu"]["name"] == "cpu" and env["template_hash"]


def test_hang_in_build_ends_as_timeout_naming_the_compile_limit(pool):
    restarts = pool.restarts
    result = fault_then_ok(pool, request("planted_hang_in_build", compile_timeout_s=0.5))
    assert result["status"] == "timeout" and "build phase exceeded its limit of 0.5 s" in result["message"]
    assert "--compile-timeout" in result["message"] and pool.restarts == restarts + 1


def test_hang_in_run_ends_as_timeout_naming_the_run_limit(pool):
    result = fault_then_ok(pool, request("planted_hang_in_run", run_timeout_s=0.5))
    assert result["status"] == "timeout" and "run phase" in result["message"] and "--run-timeout" in result["message"]


def test_raise_ends_as_runtime_error_and_the_worker_survives(pool):
    restarts = pool.restarts
    result = fault_then_ok(pool, request("planted_raise"))
    assert result["status"] == "runtime_error" and "planted fault in the kernel launch" in result["message"]
    assert pool.restarts == restarts  # a Python exception does not poison anything


def test_build_error_ends_as_compile_error(pool):
    result = fault_then_ok(pool, request("planted_compile_error"))
    assert result["status"] == "compile_error" and "seg_00_01.cu line 3" in result["message"]


def test_process_exit_ends_as_runtime_error_and_restarts(pool):
    restarts = pool.restarts
    result = fault_then_ok(pool, request("planted_exit"))
    assert result["status"] == "runtime_error" and "exit code 7" in result["message"]
    assert "run phase" in result["message"] and pool.restarts == restarts + 1


def test_segfault_ends_as_runtime_error_and_restarts(pool):
    restarts = pool.restarts
    result = fault_then_ok(pool, request("planted_segfault"))
    assert result["status"] == "runtime_error" and "SIGSEGV" in result["message"]
    assert pool.restarts == restarts + 1


def test_wrong_answer_is_a_status_not_a_latency(pool):
    result = fault_then_ok(pool, request("planted_wrong"))
    assert result["status"] == "wrong_answer" and result["latency_us"] is None
    assert result["error"]["rel"] > 2 * max(result["error"]["torch_rel"], 1e-5) and "over the limit" in result["message"]


def test_an_output_row_left_unwritten_is_caught_by_nan_poisoning(pool):
    result = fault_then_ok(pool, request("planted_stale_rows"))
    assert result["status"] == "wrong_answer" and "NaN" in result["message"]


def test_result_sent_before_a_poisoned_exit_is_kept(pool):
    restarts = pool.restarts
    poisoned = Request(kind="plan", key="plan:poisoned", cfg=CFG.to_dict(), execute=f"{HERE}:planted_execute_then_poisoned")
    # The request after it must go to a fresh worker, never to the one that is exiting.
    result = fault_then_ok(pool, poisoned)
    assert result["status"] == "ok" and result["latency_us"]["median"] == 1.0
    assert pool.restarts == restarts + 1


def test_two_workers_lose_nothing_among_mixed_faults():
    names = ["planted_ok", "planted_exit", "planted_raise", "planted_ok", "planted_wrong", "planted_ok"]
    reqs = [request(n, f"plan:{i}") for i, n in enumerate(names)]
    with WorkerPool(["cpu", "cpu"]) as two:
        results = [(req.key, res["status"]) for req, res, _ in two.run(reqs)]
    assert sorted(k for k, _ in results) == sorted(r.key for r in reqs)
    expected = {"planted_ok": "ok", "planted_exit": "runtime_error", "planted_raise": "runtime_error",
                "planted_wrong": "wrong_answer"}
    assert dict(results) == {f"plan:{i}": expected[n] for i, n in enumerate(names)}


class CpuContext:
    """WorkerContext stand-in for running execute() in this process."""

    device = "cpu"
    phase_name = "build"

    def phase(self, name):
        self.phase_name = name


def fake_plan_request(builder="planted_fake_plan"):
    return Request(kind="plan", key="plan:6826", cfg=CFG.to_dict(), mask=6826, seed=2, timing=FAST_TIMING,
                   builder=f"{HERE}:{builder}")


def test_plan_is_timed_as_one_launch_per_segment_with_precomputed_mask():
    from fusionsearch.weights import LayerWeights
    from fusionsearch.worker import draw_inputs

    plan = decode(6826)
    built = planted_fake_plan(fake_plan_request(), CFG, LayerWeights.random(CFG), draw_inputs(CFG, 0, "cpu"))
    built.run()
    timed = built.target()
    built.layer.library.launches.clear()
    timed()
    assert built.layer.library.launches == list(range(plan.kernel_count))


def test_fake_runtime_plan_passes_the_whole_execute_path():
    from fusionsearch.worker import execute

    result = execute(fake_plan_request(), CpuContext())
    assert result["status"] == "ok" and result["error"]["rel"] < 1e-5, result


def test_a_kernel_that_stops_writing_its_output_is_caught():
    from fusionsearch.worker import execute

    result = execute(fake_plan_request("planted_fake_plan_lazy"), CpuContext())
    assert result["status"] == "wrong_answer" and "NaN" in result["message"]


def test_function_paths_resolve_modules_and_files():
    assert resolve("fusionsearch.worker:execute").__name__ == "execute"
    assert resolve(f"{HERE}:planted_ok").__name__ == "planted_ok"
    with pytest.raises(fusionsearch.FusionSearchError, match="has no function 'nope'"):
        resolve("fusionsearch.worker:nope")
    with pytest.raises(fusionsearch.FusionSearchError, match="not 'module:function'"):
        resolve("fusionsearch.worker")


# ---------------------------------------------------------------- sweeps

def sweep_items(count):
    return [plan for plan, _ in zip(enumerate_plans(attention=False), range(count))]


def finals(path):
    return [r for r in records.read_records(path) if r["kind"] != "started"]


def test_sweep_writes_started_then_final_and_resume_skips_done_keys(tmp_path, pool):
    path = tmp_path / "sweep.jsonl"
    items = sweep_items(3) + [6826, "eager"]
    kw = dict(pool=pool, builder=f"{HERE}:planted_ok", timing=FAST_TIMING, progress=False)
    found = bench.run_sweep(CFG, items, path, **kw)
    assert [r["status"] for r in found] == ["ok"] * 5
    lines = list(records.read_records(path))
    assert [r["kind"] for r in lines[:2]] == ["started", "plan"] and lines[0]["key"] == lines[1]["key"]
    assert lines[-1]["kind"] == "baseline" and lines[-1]["baseline"] == "eager"
    assert found[3]["mask"] == 6826 and found[3]["gpu"]["name"] == "cpu"
    again = bench.run_sweep(CFG, items + sweep_items(4)[3:] + [6826 ^ 0x7FFF], path, **kw)
    # One record per item, in order; the complement of 6826 is the same plan and shares its record.
    assert len(again) == 7 and [r["key"] for r in again[:5]] == [r["key"] for r in found]
    assert again[6] is again[3] or again[6]["key"] == again[3]["key"]
    keys = [r["key"] for r in finals(path)]
    assert len(keys) == len(set(keys)) == 6  # the second run measured only the new plan
    other_shape = CFG.with_shape(1, 8)  # a different shape is a different sweep: nothing is skipped
    bench.run_sweep(other_shape, items[:1], path, **kw)
    assert len(finals(path)) == 7


def test_sweep_of_a_real_cpu_baseline_records_an_ok_latency(tmp_path, pool):
    path = tmp_path / "base.jsonl"
    found = bench.measure_baselines(CFG, ["eager", "sdpa"], path, pool=pool, timing=FAST_TIMING, progress=False)
    assert [r["status"] for r in found] == ["ok", "ok"], [r["message"] for r in found]
    frame = records.load_frame(path)
    assert list(frame["baseline"]) == ["eager", "sdpa"] and (frame["latency_us"] > 0).all()
    assert (frame["error_rel"] < 1e-5).all()


def test_sweep_refuses_graph_baselines_on_cpu_workers(tmp_path):
    with pytest.raises(bench.BenchError, match="needs a CUDA device"):
        bench.run_sweep(CFG, ["eager_graph"], tmp_path / "r.jsonl", devices=["cpu"], progress=False)


SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    from fusionsearch import bench
    from fusionsearch.config import LayerConfig
    from fusionsearch.plan import enumerate_plans

    cfg = LayerConfig(**{cfg!r})
    items = [p for p, _ in zip(enumerate_plans(attention=False), range({count}))]
    bench.run_sweep(cfg, items, {path!r}, devices=["cpu"], builder={builder!r}, timing={timing!r}, progress=False)
    print("sweep finished")
""")


def start_sweep(path, count):
    script = SWEEP_SCRIPT.format(cfg=CFG.to_dict(), count=count, path=str(path), builder=f"{HERE}:planted_slow_ok",
                                 timing=FAST_TIMING)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_finals(proc, path, count, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended early: {proc.communicate()}")
        if path.exists() and len([ln for ln in path.read_text().splitlines() if '"kind":"started"' not in ln]) >= count:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the sweep wrote fewer than {count} results in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_sweep_resumes_without_duplicates(tmp_path, pool, sig):
    path = tmp_path / "killed.jsonl"
    count = 6
    proc = start_sweep(path, count)
    wait_for_finals(proc, path, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    if sig == signal.SIGTERM:
        assert proc.returncode != 0 and "SweepInterrupted" in err
    partial = list(records.read_records(path))  # valid: no torn or malformed line
    done_before = {r["key"] for r in partial if r["kind"] != "started"}
    assert 2 <= len(done_before) < count
    found = bench.run_sweep(CFG, sweep_items(count), path, pool=pool, builder=f"{HERE}:planted_slow_ok",
                            timing=FAST_TIMING, progress=False)
    assert [r["status"] for r in found] == ["ok"] * count
    keys = [r["key"] for r in finals(path)]
    assert sorted(keys) == sorted(records.key_of(p) for p in sweep_items(count))  # each key exactly once
    started = [r["key"] for r in records.read_records(path) if r["kind"] == "started"]
    assert set(started) == set(keys) and len(started) >= count


# ---------------------------------------------------------------- the command line

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_command_without_cuda_exits_2_naming_the_need(tmp_path, capsys):
    from fusionsearch.cli import main

    code = main(["bench", "--shape", "2x8", "--baselines", "--records", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs a CUDA GPU" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_bench_command_rejects_bad_input_with_exit_2(capsys):
    from fusionsearch.cli import main

    assert main(["bench", "--shape", "2y8", "--baselines"]) == 2
    assert "not of the form BxS" in capsys.readouterr().err
    assert main(["bench", "--shape", "2x8", "--baselines", "tensorrt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--shape", "2x8"]) == 2
    assert "nothing to measure" in capsys.readouterr().err


def test_bench_table_reports_the_best_plans_speedup_over_the_best_baseline(tmp_path, capsys):
    from fusionsearch.cli.bench import _print_table, _report

    env = {"gpu": {"name": "GPU", "capability": "9.0", "sm_count": 132}, "torch": "t", "cuda": "c",
           "template_hash": "h"}

    def ok(item, median):
        lat = {"median": median, "p20": median * 0.9, "p80": median * 1.1, "mean": median, "min": median * 0.8,
               "max": median * 1.5, "repeats": 30}
        return records.make_record(item, CFG, "ok", latency_us=lat, error={"rel": 1e-3, "torch_rel": 1e-3,
                                                                           "max_abs": 0.1}, env=env)

    found = [ok(decode(6826), 40.0), ok(decode(1365), 50.0), ok("sdpa_graph", 70.0), ok("eager", 120.0),
             records.make_record(decode(0), CFG, "wrong_answer", message="over the limit", env=env)]
    report = _report(CFG, found, tmp_path / "r.jsonl", {"peak_tflops": 700.0, "bandwidth_tbs": 3.0}, 4.2)
    assert report["best"] == "plan:6826" and report["best_baseline"] == "sdpa_graph"
    assert report["speedup"] == pytest.approx(70.0 / 40.0)
    _print_table(report)
    out = capsys.readouterr().out
    assert "best plan:6826 40.0 µs vs best baseline sdpa_graph 70.0 µs: 1.75× speed-up, floor 4.2 µs" in out
    lines = out.splitlines()
    assert lines[2].startswith("plan:6826") and "wrong_answer" in lines[6]  # fastest first, failures last
