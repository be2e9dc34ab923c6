"""Latency of a zero-argument callable: CUDA-graph replays or eager calls, timed with CUDA events.

Cache state. Two ways keep the 50 MB L2 from flattering small shapes:

* `rotate_inputs`: K callables, each making input set k current (swapping the tensors `fn` reads). The graph is
  captured ONCE over the K sets in turn (set 0, set 1, …, set K−1, and again, until the graph holds enough
  work), not as K graphs. One replay then runs many calls for one host launch, so the GPU never waits for the
  host even when a call lasts a few µs, and the choice of graph stays out of the timed loop.
  Consecutive calls read different memory; with K × (bytes per set) above twice the L2 every call misses.
* `flush_l2`: before every sample an eager write of a buffer twice the L2's size evicts it; the sample is one
  replay of a graph of one call. A flush cannot sit inside the measured graph (it would be timed), so each sample
  has its own event pair and event resolution (~0.5 µs) limits precision at µs scale.

Neither: the hot-cache latency of back-to-back calls.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from .errors import FusionSearchError

DEFAULT_WARMUP = 3
DEFAULT_MIN_REPEATS = 10
DEFAULT_MAX_REPEATS = 100
DEFAULT_TARGET_MS = 100.0
# One event pair should span this much GPU time: event resolution is ~0.5 µs, so the error stays under 0.5 %.
SAMPLE_US = 100.0
# A graph replay costs the host a few µs; a graph holding at least this much work keeps the GPU busy meanwhile.
MIN_GRAPH_US = 20.0
MAX_UNROLL = 64


class TimingError(FusionSearchError):
    """A callable that cannot be timed as asked (no CUDA for graph timing, a capture that fails)."""


def summarize(samples_us: Sequence[float]) -> dict:
    """median, p20, p80, mean, min, max (µs) and repeats of per-call samples."""
    import numpy as np

    values = np.asarray(samples_us, dtype=np.float64)
    if values.size == 0:
        raise TimingError("no timing samples were taken; give min_repeats ≥ 1")
    return {"median": float(np.median(values)), "p20": float(np.percentile(values, 20)),
            "p80": float(np.percentile(values, 80)), "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max()), "repeats": int(values.size)}


def _repeat_count(sample_us: float, min_repeats: int, max_repeats: int, target_ms: float) -> int:
    """Samples that fill target_ms, within [min_repeats, max_repeats]: slow shapes get fewer."""
    if min_repeats < 1 or max_repeats < min_repeats:
        raise TimingError(f"repeats must satisfy 1 ≤ min_repeats ({min_repeats}) ≤ max_repeats ({max_repeats})")
    wanted = int(target_ms * 1000.0 / max(sample_us, 1e-3))
    return max(min_repeats, min(max_repeats, wanted))


def l2_bytes(device=None) -> int:
    """L2 cache size of the device (50 MB, the H100's, if the driver does not say)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


class L2Flusher:
    """Evicts the L2 by writing a buffer twice its size (a write allocates every line it touches)."""

    def __init__(self, device=None) -> None:
        import torch

        self.buffer = torch.empty(2 * l2_bytes(device), dtype=torch.uint8, device="cuda" if device is None else device)
        self._value = 0

    def flush(self) -> None:
        self._value = (self._value + 1) % 251
        self.buffer.fill_(self._value)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise TimingError("CUDA-graph timing needs a CUDA GPU and torch.cuda.is_available() is False; "
                          "use time_eager on the CPU")


def _run_pass(fn: Callable, setters: Sequence[Callable | None]) -> None:
    for setter in setters:
        if setter is not None:
            setter()
        fn()


def _capture(fn: Callable, setters: Sequence[Callable | None], unroll: int):
    import torch

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(unroll):
                _run_pass(fn, setters)
    except Exception as error:  # capture of host syncs, CPU tensors, dynamic shapes…: not graphable
        raise TimingError(f"CUDA-graph capture failed ({type(error).__name__}: {error}); the callable syncs "
                          f"with the host or allocates dynamically; time it with time_eager") from error
    return graph


def _event_pairs(count: int):
    import torch

    return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]


def capture_graph(fn: Callable, setters: Sequence[Callable | None] = (None,), *, warmup: int = DEFAULT_WARMUP,
                  unroll: int = 1):
    """Warm `fn` up (`warmup` passes over the setters), capture `unroll` passes in a CUDA graph; the graph and the
    median µs of a few single replays, the first estimate that sizes a measurement."""
    import torch

    _require_cuda()
    if warmup > 0:
        # PyTorch's rule for capture: warm up on a side stream first, so lazy initialisation (cuBLAS handles and
        # workspaces, allocator growth, autotuning) happens outside the graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                _run_pass(fn, setters)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    graph = _capture(fn, setters, unroll)
    return graph, _replay_us(graph, 3)


def time_cuda_graph(fn: Callable, *, warmup: int = DEFAULT_WARMUP, min_repeats: int = DEFAULT_MIN_REPEATS,
                    max_repeats: int = DEFAULT_MAX_REPEATS, target_ms: float = DEFAULT_TARGET_MS,
                    rotate_inputs: Sequence[Callable] | None = None, flush_l2: bool = False,
                    flusher: L2Flusher | None = None) -> dict:
    """Per-call latency (µs statistics) of `fn` captured in a CUDA graph and replayed, timed with CUDA events."""
    import torch

    _require_cuda()
    setters: list[Callable | None] = list(rotate_inputs) if rotate_inputs else [None]
    graph, pass_us = capture_graph(fn, setters, warmup=max(1, warmup))
    unroll = 1
    if not flush_l2 and pass_us < MIN_GRAPH_US:
        unroll = min(MAX_UNROLL, math.ceil(MIN_GRAPH_US / max(pass_us, 0.1)))
        del graph
        graph, graph_us = capture_graph(fn, setters, warmup=0, unroll=unroll)
        pass_us = graph_us / unroll
    calls_per_pass = len(setters)
    calls = calls_per_pass * unroll
    graph_us = pass_us * unroll

    if flush_l2:
        flusher = flusher or L2Flusher()
        replays = 1
    else:
        replays = max(1, math.ceil(SAMPLE_US / max(graph_us, 1e-3)))
    count = _repeat_count(graph_us * replays, min_repeats, max_repeats, target_ms)
    pairs = _event_pairs(count)
    for start, end in pairs:
        if flush_l2:
            flusher.flush()
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) * 1000.0 / (replays * calls) for start, end in pairs]
    del graph
    return summarize(samples)


def _replay_us(graph, times: int) -> float:
    """Median µs of a few single replays (a first estimate that sizes the real measurement)."""
    import torch

    graph.replay()
    pairs = _event_pairs(times)
    for start, end in pairs:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    values = sorted(start.elapsed_time(end) * 1000.0 for start, end in pairs)
    return values[len(values) // 2]


def time_eager(fn: Callable, *, warmup: int = DEFAULT_WARMUP, min_repeats: int = DEFAULT_MIN_REPEATS,
               max_repeats: int = DEFAULT_MAX_REPEATS, target_ms: float = DEFAULT_TARGET_MS,
               rotate_inputs: Sequence[Callable] | None = None, flush_l2: bool = False, device: str | None = None,
               flusher: L2Flusher | None = None) -> dict:
    """Per-call latency of `fn` launched from Python (host overhead included); CUDA events, or a host clock on CPU."""
    import torch

    on_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if flush_l2 and not on_cuda:
        raise TimingError("flush_l2 needs a CUDA device; the CPU's caches are not flushed by fusionsearch")
    setters: list[Callable | None] = list(rotate_inputs) if rotate_inputs else [None]
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    for _ in range(max(1, warmup)):
        _run_pass(fn, setters)
    sync()
    began = time.perf_counter()
    _run_pass(fn, setters)
    sync()
    pass_us = (time.perf_counter() - began) * 1e6
    # Rotation makes one pass over the K sets the unit of measurement; the setters are cheap host work.
    passes = 1 if flush_l2 else max(1, math.ceil(SAMPLE_US / max(pass_us, 1e-3)))
    count = _repeat_count(pass_us * passes, min_repeats, max_repeats, target_ms)
    calls = passes * len(setters)
    if not on_cuda:
        samples = []
        for _ in range(count):
            began = time.perf_counter()
            for _ in range(passes):
                _run_pass(fn, setters)
            samples.append((time.perf_counter() - began) * 1e6 / calls)
        return summarize(samples)
    if flush_l2:
        flusher = flusher or L2Flusher()
    pairs = _event_pairs(count)
    for start, end in pairs:
        if flush_l2:
            flusher.flush()
        start.record()
        for _ in range(passes):
            _run_pass(fn, setters)
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) * 1000.0 / calls for start, end in pairs])


def run_and_list_kernels(fn: Callable):
    """(what one call of fn returns, the names of the GPU kernels it launched in launch order), from torch's
    profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise TimingError("listing the kernels a call launches needs a CUDA GPU and torch.cuda.is_available() is "
                          "False; run it on a GPU machine")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return result, [event.name for event in prof.events() if event.device_type.name == "CUDA"]


def launched_kernels(fn: Callable) -> list[str]:
    """Names of the GPU kernels one call of fn launches (after a warm-up call), sorted: which backend or tile a
    library picked shows in them."""
    import torch

    if torch.cuda.is_available():
        fn()
        torch.cuda.synchronize()
    return sorted(set(run_and_list_kernels(fn)[1]))
