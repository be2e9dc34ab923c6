"""On a CUDA GPU: a short real sweep of plans, segments and baselines, the timing methods, and CUDA faults
(device-side assert, a hung kernel) that end as their status while the next request still succeeds."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from fusionsearch import bench, records
from fusionsearch.config import LayerConfig
from fusionsearch.mask import decode
from fusionsearch.plan import Plan, Segment
from fusionsearch.reference import reference_forward
from fusionsearch.worker import Request, WorkerPool

pytestmark = pytest.mark.gpu

HERE = str(Path(__file__).resolve())
# Small but real: BERT head size, 4 heads, padded keys, and a sequence length that is not a multiple of 8.
CFG = LayerConfig(batch=2, seq_len=61, heads=4, head_size=64, ffn=1024, dtype="fp16")
TIMING = {"min_repeats": 10, "max_repeats": 30, "target_ms": 20.0}
PLANS = [Plan.from_cuts(set(range(1, 15))),                 # every operator its own kernel
         decode(6826), decode(1365),                         # the seed's examples
         Plan.from_cuts({1, 2, 6, 7, 10, 12}, attention=True)]  # the flash-attention kernel inside a plan
SEGMENTS = [Segment(0, 0), Segment(10, 11)]
BASELINES = ["eager", "eager_graph", "sdpa_graph", "nn_fastpath", "compile_graph"] + \
    (["hf_bert_graph"] if importlib.util.find_spec("transformers") else [])


# ---------------------------------------------------------------- planted builders (run inside the worker)

def planted_ok(request, cfg, weights, inputs):
    return lambda: reference_forward(inputs.x, inputs.attention_mask, weights, cfg, compute_dtype=inputs.x.dtype)


def planted_device_assert(request, cfg, weights, inputs):
    def run():
        table = torch.zeros(4, device=inputs.x.device)
        index = torch.tensor([1 << 40], device=inputs.x.device)
        table[index].sum().item()  # out-of-range gather: a device-side assert that poisons the context
        return planted_ok(request, cfg, weights, inputs)()
    return run


def planted_gpu_hang(request, cfg, weights, inputs):
    def run():
        torch.cuda._sleep(1 << 62)  # spins on the GPU for ever
        torch.cuda.synchronize()
    return run


def request(name, key, **kw):
    return Request(kind="plan", key=key, cfg=CFG.to_dict(), mask=0, seed=3, timing=TIMING,
                   builder=f"{HERE}:{name}", **kw)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(["cuda:0"]) as shared:
        shared.environments()
        yield shared


# ---------------------------------------------------------------- a real sweep

def test_short_sweep_of_plans_segments_and_baselines(tmp_path, pool):
    path = tmp_path / "sweep.jsonl"
    items = PLANS + SEGMENTS + BASELINES
    found = bench.run_sweep(CFG, items, path, pool=pool, timing=TIMING, progress=False)
    problems = [(r["key"], r["status"], r["message"]) for r in found if r["status"] != "ok"]
    assert not problems, problems
    for record in found:
        lat = record["latency_us"]
        assert 0 < lat["min"] <= lat["p20"] <= lat["median"] <= lat["p80"] <= lat["max"]
        assert record["gpu"]["name"] != "cpu" and record["gpu"]["capability"] and record["cuda"]
        assert record["error"]["rel"] <= 2 * max(record["error"]["torch_rel"], 1e-5)
    by_key = {r["key"]: r for r in found}
    # At this launch-bound size a CUDA graph must beat Python launches of the same chain.
    assert by_key["baseline:eager_graph"]["latency_us"]["median"] < by_key["baseline:eager"]["latency_us"]["median"]
    # Segments are timed alone: each must be faster than the whole unfused plan.
    whole = by_key[records.key_of(PLANS[0])]["latency_us"]["median"]
    assert all(by_key[records.key_of(s)]["latency_us"]["median"] < whole for s in SEGMENTS)
    frame = records.load_frame(path, expect=records.expect_here("fp16", pool.environments()[0]))
    assert len(frame) == len(items) and frame["latency_us"].notna().all()
    # Resume measures nothing again.
    again = bench.run_sweep(CFG, items, path, pool=pool, timing=TIMING, progress=False)
    assert [r["time"] for r in again] == [r["time"] for r in found]


def test_ceilings_are_plausible(pool):
    ceilings = bench.measure_ceilings(CFG, pool=pool)
    assert ceilings is not None and 50 < ceilings["peak_tflops"] < 5000 and 0.3 < ceilings["bandwidth_tbs"] < 20


# ---------------------------------------------------------------- CUDA faults

def test_device_assert_ends_as_runtime_error_and_the_next_request_succeeds(pool):
    restarts = pool.restarts
    results = {req.key: res for req, res, _ in pool.run([request("planted_device_assert", "plan:assert"),
                                                          request("planted_ok", "plan:after")])}
    assert results["plan:assert"]["status"] == "runtime_error"
    assert "assert" in results["plan:assert"]["message"].lower() or "CUDA" in results["plan:assert"]["message"]
    assert results["plan:after"]["status"] == "ok", results["plan:after"]["message"]
    assert pool.restarts == restarts + 1  # a poisoned context is never reused


def test_hung_kernel_ends_as_timeout_and_the_next_request_succeeds(pool):
    began = time.monotonic()
    results = {req.key: res for req, res, _ in pool.run([request("planted_gpu_hang", "plan:hang", run_timeout_s=5.0),
                                                          request("planted_ok", "plan:after2")])}
    assert results["plan:hang"]["status"] == "timeout" and "run phase" in results["plan:hang"]["message"]
    assert results["plan:after2"]["status"] == "ok", results["plan:after2"]["message"]
    assert time.monotonic() - began < 120


# ---------------------------------------------------------------- timing methods

def test_graph_timing_beats_eager_launches_of_a_tiny_kernel():
    from fusionsearch import timing

    x = torch.randn(1024, device="cuda")
    graph = timing.time_cuda_graph(lambda: x.mul_(1.0001), target_ms=20)
    eager = timing.time_eager(lambda: x.mul_(1.0001), target_ms=20)
    assert graph["median"] < eager["median"] and graph["repeats"] >= timing.DEFAULT_MIN_REPEATS


def test_rotation_and_flush_defeat_the_l2():
    from fusionsearch import timing

    elements = 4 * 2**20  # 16 MB fp32 source + 16 MB destination: fits a 50 MB L2 when hot
    sets = [(torch.randn(elements, device="cuda"), torch.empty(elements, device="cuda")) for _ in range(16)]
    current = [sets[0]]

    def copy():
        src, dst = current[0]
        dst.copy_(src)

    hot = timing.time_cuda_graph(copy, target_ms=20)
    rotated = timing.time_cuda_graph(copy, target_ms=20,
                                     rotate_inputs=[(lambda s=s: current.__setitem__(0, s)) for s in sets])
    current[0] = sets[0]
    flushed = timing.time_cuda_graph(copy, target_ms=20, flush_l2=True)
    assert rotated["median"] > 1.05 * hot["median"], (hot, rotated)
    assert flushed["median"] > 1.05 * hot["median"], (hot, flushed)


# ---------------------------------------------------------------- the command

def test_bench_command_prints_the_speedup_over_the_best_baseline(tmp_path, capsys):
    from fusionsearch.cli import main

    args = ["bench", "--shape", "2x61", "--heads", "4", "--ffn", "1024", "--masks", "6826", "--baselines",
            "eager", "sdpa_graph", "--records", str(tmp_path / "r.jsonl"), "--no-floor"]
    assert main(args + ["--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["best"] == "plan:6826" and report["best_baseline"] in ("eager", "sdpa_graph")
    assert report["speedup"] == pytest.approx(report["best_baseline_us"] / report["best_us"])
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "plan:6826" in out
    assert len([r for r in records.read_records(tmp_path / "r.jsonl") if r["kind"] != "started"]) == 3


# ---------------------------------------------------------------- the exhaustive sweep, in process

def test_sweep_shape_measures_plans_and_segments_here_and_baselines_in_workers(tmp_path):
    from fusionsearch import sweep
    from fusionsearch.plan import all_segments

    path = tmp_path / "sweep.jsonl"
    done = sweep.sweep_shape(CFG, path, plans=PLANS, baselines=["eager"], device="cuda:0", progress=False)
    problems = [(r["key"], r["status"], r["message"]) for r in done.found if r["status"] != "ok"]
    assert not problems, problems
    assert [r["key"] for r in done.found] == [records.key_of(x) for x in PLANS + list(all_segments()) + ["eager"]]
    assert done.plan_counts == {"skipped": 0, "ok": len(PLANS)} and done.segment_counts["ok"] == 150
    assert len({r["gpu"]["name"] for r in done.found}) == 1  # baselines ran on the sweep's GPU
    again = sweep.sweep_shape(CFG, path, plans=PLANS, baselines=["eager"], device="cuda:0", progress=False)
    assert again.plan_counts == {"skipped": len(PLANS)} and again.segment_counts == {"skipped": 150}
    assert [r["time"] for r in again.found] == [r["time"] for r in done.found]


def test_bench_all_command_sweeps_in_process_and_resumes(tmp_path, capsys, monkeypatch):
    from fusionsearch import sweep
    from fusionsearch.cli import main

    monkeypatch.setattr(sweep, "enumerate_plans", lambda: iter(PLANS))  # all 18,432 would take minutes
    path = tmp_path / "r.jsonl"
    args = ["bench", "--shape", "2x61", "--heads", "4", "--ffn", "1024", "--all", "--baselines", "eager",
            "--records", str(path), "--no-floor"]
    assert main(args + ["--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"plan": {"ok": len(PLANS)}, "segment": {"ok": 150}, "baseline": {"ok": 1}}
    assert report["best"].startswith("plan:") and report["best_baseline"] == "eager"
    assert report["speedup"] == pytest.approx(report["best_baseline_us"] / report["best_us"])
    written = len(list(records.read_records(path)))
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and report["best"] in out
    assert len(list(records.read_records(path))) == written  # resume measured nothing again


# ---------------------------------------------------------------- patch()

def test_a_patched_model_converts_its_mask_once_per_call(monkeypatch):
    """Three patched HF layers share one key bias per model call: each layer after the first launches none of the
    mask conversion's kernels, and the output is the same as with every layer converting its own mask (and close
    to the fp32 model)."""
    transformers = pytest.importorskip("transformers")
    import copy

    from fusionsearch import patching
    from fusionsearch.runtime import attend_mask, key_bias
    from fusionsearch.timing import run_and_list_kernels

    config = transformers.BertConfig(hidden_size=CFG.hidden, num_attention_heads=CFG.heads,
                                     intermediate_size=CFG.ffn, num_hidden_layers=3, hidden_act="gelu")
    torch.manual_seed(0)
    reference = transformers.BertModel(config).eval().cuda()
    model = copy.deepcopy(reference).half()
    ids = torch.randint(0, config.vocab_size, (CFG.batch, CFG.seq_len), device="cuda")
    mask = torch.ones(CFG.batch, CFG.seq_len, dtype=torch.long, device="cuda")
    mask[1, 40:] = 0
    assert len(patching.patch(model, PLANS[3]).replaced) == 3
    layer_masks = []  # the mask the model hands its first layer, as that layer receives it
    model.encoder.layer[0].register_forward_pre_hook(
        lambda _, args, kwargs: layer_masks.append(kwargs.get("attention_mask", args[1] if len(args) > 1 else None)),
        with_kwargs=True)

    def run():
        return model(ids, attention_mask=mask).last_hidden_state

    with torch.no_grad():
        run()  # first calls set kernel attributes
        shared, shared_kernels = run_and_list_kernels(run)
        monkeypatch.setattr(patching.MaskBiasCache, "bias_for", lambda self, m, make: None if m is None else make(m))
        own, own_kernels = run_and_list_kernels(run)
        expected = reference(ids, attention_mask=mask).last_hidden_state
        _, conversion = run_and_list_kernels(lambda: key_bias(attend_mask(layer_masks[-1])))
    assert conversion, "converting the layer's mask launched no kernel, so sharing it cannot be seen"
    assert torch.equal(shared, own)
    valid = mask.bool()
    error = float((shared[valid].float() - expected[valid]).norm() / expected[valid].norm())
    assert error < 1e-2, error
    assert len(own_kernels) - len(shared_kernels) == len(conversion) * (3 - 1), (conversion, own_kernels,
                                                                                 shared_kernels)
