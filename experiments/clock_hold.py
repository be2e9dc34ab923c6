"""Replay kernels back to back for a while and read the GPU's SM clock and power from nvidia-smi meanwhile.

A kernel that runs as long as another with the same tensor-core work but more ALU work may be slower because it
issues more, or because the GPU lowers its clock to stay within its power limit. Short timings cannot tell the
two apart; a steady hold of a second or more can: the clock it settles at, the power it draws and the reasons
the driver gives for holding the clock down.

    from clock_hold import hold
    row = hold(calls, seconds=2.0)   # µs per call, SM MHz, W, event reasons seen in the second half
"""
from __future__ import annotations

import statistics
import subprocess
import time

QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"


def _sampler(period_ms: int) -> subprocess.Popen:
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                             f"-lms={period_ms}", "-i", "0"], stdout=subprocess.PIPE, text=True)


def _read_samples(proc: subprocess.Popen) -> list[tuple[float, float, int]]:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    samples = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            samples.append((float(fields[0]), float(fields[1]), int(fields[2], 16)))
        except (ValueError, IndexError):
            continue  # a header or a field the driver reports as [N/A]
    return samples


def hold(calls, seconds: float = 2.0, period_ms: int = 50) -> dict:
    """Replay `calls` (zero-argument launches, run in order) in a CUDA graph for `seconds`; the second half's
    per-call time (CUDA events), median SM clock (MHz) and power (W), and the OR of the clock event reasons."""
    import torch

    from fusionsearch.timing import capture_graph

    graph, graph_us = capture_graph(lambda: [call() for call in calls], warmup=1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = max(1, int(0.05 * seconds * 1e6 / max(graph_us, 1.0)))  # ~20 batches

    sampler = _sampler(period_ms)
    time.sleep(0.3)  # nvidia-smi's start-up, so its first samples fall inside the hold
    begin = time.monotonic()
    batches = []
    while time.monotonic() - begin < seconds:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        batches.append((time.monotonic() - begin, start.elapsed_time(end) * 1e3 / (replays * len(calls))))
    samples = _read_samples(sampler)
    late = [b for t, b in batches if t >= seconds / 2] or [b for _, b in batches]
    settled = samples[len(samples) // 2:] or samples
    reasons = 0
    for _, _, r in settled:
        reasons |= r
    return {"us_per_call": statistics.median(late), "batches": len(batches),
            "sm_mhz": statistics.median(s[0] for s in settled) if settled else None,
            "sm_mhz_min": min(s[0] for s in settled) if settled else None,
            "power_w": statistics.median(s[1] for s in settled) if settled else None,
            "event_reasons": f"0x{reasons:x}", "samples": len(settled)}
