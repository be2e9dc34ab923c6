"""Exhaustive sweeps in one process: every plan (and every segment) of one shape, verified, timed, recorded.

The worker path (bench.run_sweep) isolates each measurement in a process and draws fresh weights per
request, which costs about a second a plan; an exhaustive sweep of 18,432 plans needs milliseconds. Here the
kernel library, the rotated weight/input sets, the buffers and the fp32 reference are built once per shape;
each plan is then checked against the reference (outputs and intermediates NaN-poisoned) and timed with CUDA
events over CUDA-graph replays. Records are appended and fsynced one by one, so a killed sweep resumes where
it stopped. Every kernel was verified on fresh inputs by the GPU suite; here all plans share one input draw.

No process boundary isolates a kernel here: a crashing kernel stops the sweep (its `started` record stays without
a result). `sweep_shape` is the whole exhaustive sweep of one shape, as `fusionsearch bench --all` and
experiments/run_sweeps.py run it: plans and segments here, then the PyTorch baselines in bench's workers.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from . import records, timing
from .config import LayerConfig
from .plan import Plan, all_segments, enumerate_plans
from .reference import error_budget, reference_forward
from .runtime import FusedEncoderLayer, KernelLibrary, key_bias
from .verify import random_inputs, verify_segment
from .weights import LayerWeights, torch_dtype
from .worker import rotation_count

# Adaptive repeats: 7 samples while a sample is short, down to 3 once a plan runs for milliseconds (large shapes,
# where the spread is a fraction of a percent), so an exhaustive sweep of a large shape stays within minutes.
SWEEP_TIMING = {"warmup": 1, "min_repeats": 3, "max_repeats": 7, "target_ms": 5.0}


class _Rig:
    """Rotated weight/input sets of one shape with one layer each, switched from plan to plan."""

    def __init__(self, cfg: LayerConfig, seed: int, first: Plan):
        self.cfg = cfg
        dtype = torch_dtype(cfg.dtype)
        self.library = KernelLibrary.get(cfg)
        self.weights32 = LayerWeights.random(cfg, seed=seed, device="cuda")
        self.sets = []
        for k in range(rotation_count(cfg)):
            w32 = self.weights32 if k == 0 else LayerWeights.random(cfg, seed=seed + 1000 * k, device="cuda")
            x, mask = random_inputs(cfg, seed + k)
            layer = FusedEncoderLayer(first, w32, cfg, library=self.library)
            self.sets.append((layer, x.to(dtype), mask, key_bias(mask)))
        layer, x, mask, _ = self.sets[0]
        self.reference = reference_forward(x.float(), mask, self.weights32, cfg, torch.float32)
        self.eager = reference_forward(x, mask, self.weights32, cfg, dtype)
        self.scale = 1.0 / math.sqrt(cfg.head_size)

    def switch(self, plan: Plan) -> None:
        for layer, *_ in self.sets:
            layer.set_plan(plan)

    def check(self):
        """Run set 0 with poisoned buffers; the error budget against the fp32 reference."""
        layer, x, mask, _ = self.sets[0]
        layer.poison_workspace(self.cfg.batch, self.cfg.seq_len)
        out = torch.full_like(x, float("nan"))
        layer.run_into(x, mask, out)
        return error_budget(self.reference, self.eager, out)

    def launchers(self, kernel_ids=None):
        """One zero-argument launch per set (precomputed tensors: no per-call mask conversion)."""
        calls = []
        for layer, x, _, bias in self.sets:
            tensors = layer.tensors_for(x, bias, torch.empty_like(x))
            ids = layer.kernel_ids if kernel_ids is None else kernel_ids
            calls.append(lambda t=tensors, ids=ids, lib=layer.library: lib.run(
                ids, t, self.cfg.batch, self.cfg.seq_len, self.cfg.eps, self.scale))
        return calls

    def time(self, calls) -> dict:
        current = [calls[0]]
        setters = [(lambda c=c: current.__setitem__(0, c)) for c in calls] if len(calls) > 1 else None
        return timing.time_cuda_graph(lambda: current[0](), rotate_inputs=setters, **SWEEP_TIMING)


def _progress(total: int, label: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="plan", disable=not sys.stderr.isatty(), dynamic_ncols=True)


def sweep_plans(cfg: LayerConfig, plans: Iterable[Plan], path, *, seed: int = 0, resume: bool = True) -> dict:
    """Verify and time each plan; append one record per plan; return counts by status."""
    plans = list(plans)
    env = records.environment()
    done = records.done_keys(path, match=records.sweep_match(cfg, env)) if resume else set()
    todo = [p for p in plans if records.key_of(p) not in done]
    counts = {"skipped": len(plans) - len(todo)}
    if not todo:
        return counts
    rig = _Rig(cfg, seed, todo[0])
    best = math.inf
    with records.RecordWriter(path) as writer, _progress(len(todo), cfg.shape_text) as bar:
        for plan in todo:
            writer.started(plan, cfg, env=env)
            rig.switch(plan)
            budget = rig.check()
            error = {"rel": budget.candidate_error, "torch_rel": budget.eager_error}
            if not budget.ok:
                writer.write(records.make_record(plan, cfg, "wrong_answer", error=error, message=budget.reason, env=env))
                counts["wrong_answer"] = counts.get("wrong_answer", 0) + 1
            else:
                stats = rig.time(rig.launchers())
                writer.write(records.make_record(plan, cfg, "ok", latency_us=stats, error=error, env=env))
                counts["ok"] = counts.get("ok", 0) + 1
                best = min(best, stats["median"])
            bar.set_postfix(best_us=f"{best:.1f}", failed=counts.get("wrong_answer", 0))
            bar.update()
    return counts


def sweep_segments(cfg: LayerConfig, path, *, seed: int = 0, resume: bool = True) -> dict:
    """Verify each segment kernel alone on fresh inputs, then time it alone; one record per segment."""
    env = records.environment()
    done = records.done_keys(path, match=records.sweep_match(cfg, env)) if resume else set()
    segments = [s for s in all_segments() if records.key_of(s) not in done]
    counts = {"skipped": len(all_segments()) - len(segments)}
    if not segments:
        return counts
    unfused = Plan.from_cuts(set(range(1, 15)))
    rig = _Rig(cfg, seed, unfused)
    # Every buffer a segment may read: run both an unfused plan and a pos0 plan once on every set.
    for plan in (Plan.from_cuts(set(range(1, 15)) - {3, 4, 5}, attention=True), unfused):
        rig.switch(plan)
        for call in rig.launchers():
            call()
    with records.RecordWriter(path) as writer:
        for index, segment in enumerate(segments):
            writer.started(segment, cfg, env=env)
            budget = verify_segment(rig.library, segment, rig.weights32, cfg, seed=seed + index)
            error = {"rel": budget.candidate_error, "torch_rel": budget.eager_error}
            if not budget.ok:
                writer.write(records.make_record(segment, cfg, "wrong_answer", error=error, message=budget.reason,
                                                 env=env))
                continue
            stats = rig.time(rig.launchers([rig.library.index(segment)]))
            writer.write(records.make_record(segment, cfg, "ok", latency_us=stats, error=error, env=env))
            counts["ok"] = counts.get("ok", 0) + 1
    return counts


@dataclass(frozen=True)
class ShapeSweep:
    """What sweep_shape measured: counts by status, the plans' wall time, and one final record per item."""

    plan_counts: dict
    plan_seconds: float
    segment_counts: dict
    found: list[dict]  # plans in the order given, then segments, then baselines


def sweep_shape(cfg: LayerConfig, path, *, plans: "Iterable[Plan] | None" = None,
                baselines: "Iterable[str] | None" = None, device: "str | None" = None, seed: int = 0,
                resume: bool = True, segments: bool = True, **worker_options) -> ShapeSweep:
    """Every plan (all canonical ones unless `plans` is given) and every segment alone (unless `segments` is
    False), in this process on `device`, then the PyTorch baselines (None: the default set; empty: none) in
    workers on the same GPU, so that all records of the shape share one GPU. `worker_options` go to
    bench.run_sweep (timeouts, progress)."""
    from . import bench

    device = _use_device(device)
    plans = list(enumerate_plans()) if plans is None else list(plans)
    start = time.perf_counter()
    plan_counts = sweep_plans(cfg, plans, path, seed=seed, resume=resume)
    plan_seconds = time.perf_counter() - start
    segment_counts = sweep_segments(cfg, path, seed=seed, resume=resume) if segments else {}
    names = None if baselines is None else list(baselines)
    found_baselines = [] if names == [] else bench.measure_baselines(
        cfg, names, path, devices=[device], resume=resume, **worker_options)
    found = _final_records(cfg, path, plans + (list(all_segments()) if segments else [])) + found_baselines
    return ShapeSweep(plan_counts, plan_seconds, segment_counts, found)


def _use_device(device: "str | None") -> str:
    """Make `device` (default: the current CUDA device) the one this process sweeps on; its 'cuda:I' name."""
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}"
    torch.cuda.set_device(device)
    return device


def _final_records(cfg: LayerConfig, path, items: list) -> list[dict]:
    """The last final record of each item in `path` from this GPU and templates (an item without one is left out)."""
    latest = records.final_records(path, match=records.sweep_match(cfg, records.environment()))
    keys = dict.fromkeys(records.key_of(item) for item in items)  # a plan given twice is reported once
    return [latest[key] for key in keys if key in latest]
