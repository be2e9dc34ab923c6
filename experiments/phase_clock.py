"""Where a resident-weight kernel's time goes, phase by phase, from clocks its blocks stamp (needs the probe patch).

    git apply experiments/patches/probe-resident-phase-clock.patch
    PYTHONPATH=. python experiments/phase_clock.py --cases 1x32:32768 2x32:32768 [--dtypes fp16] [--launches 50] \
        [--out DIR]

The patch makes thread 0 of every block of a resident-weight kernel stamp %globaltimer and clock64 when the kernel
starts, inside its start (once its slices are read, once past the block barrier, once the first GEMM's copy is
issued), when its weight copies are issued, before and after every stage, when each GEMM's weight slice has landed,
and inside each resident GEMM's first row group (kernels/fs_common.cuh `phase_clock`, slots below). This script
checks each plan against fp32, captures it in a CUDA graph, replays it --launches times with the stamps cleared
before each, and prints per phase the µs since the first block started: the earliest, median and latest block, each
the median over the launches; then the same cut into the start, the stages (with their GEMMs' steps), the grid
barriers and what no stamp sees (`parts`). Per-block intervals come from clock64 at the block's own rate (its
cycles over its globaltimer span), since the globaltimer may tick coarser than the phases are long; the offset of
each block's start comes from the globaltimer. Writes DIR/phase-<shape>-<dtype>.md and .json when --out is given.
Without the patch no stamps appear and it says so.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_ab import PreparedPlan, parse_case  # noqa: E402

SLOTS = 64  # kPhaseClockSlots
PHASE_FLOATS = 256 * SLOTS * 4  # 256 blocks × SLOTS slots × two u64, at the end of the split-K partials
WEIGHT_SLOT = 24  # phase of GEMM slot s's weights landing: 24 + s
# Phases inside Resident::start (fs_gemm_resident.cuh in the probe); stage i takes slots 2i and 2i + 1, below them. The
# start issues the first GEMM's copies; the later GEMMs' go out inside the first GEMM, under its loads of A.
START_SLOTS = {20: "slices read, weight barriers armed", 21: "start's block barrier passed",
               22: "first GEMM's weight copy issued (thread 0)"}
# Phases inside resident GEMM slot s, its first group of 32 rows: slot GEMM_SLOT + 4s + k for k in this order.
GEMM_SLOT = 32
GEMM_PHASES = ("thread 0's A in and its sums written", "every warp's sums in", "thread 0's results stored",
               "this split's arrival counted")


def phase_names(stage_ops: list[tuple[int, ...]], gemm_ops: list[int]) -> dict[int, str]:
    """Slot → name for a resident kernel of these stages (operators per stage) and resident GEMMs (stage order)."""
    if 2 * len(stage_ops) + 1 >= min(START_SLOTS):
        raise ValueError(f"{len(stage_ops)} stages need slots up to {2 * len(stage_ops) + 1}, past the probe's "
                         f"{min(START_SLOTS)}: move START_SLOTS and the probe's stamps up")
    names = {0: "kernel start", 1: "the start's weight copies issued", **START_SLOTS}
    for i, ops in enumerate(stage_ops, start=1):
        label = f"stage {i} ({ops[0]}–{ops[-1]})" if len(ops) > 1 else f"stage {i} ({ops[0]})"
        if i > 1:
            names[2 * i] = f"{label} starts (grid barrier passed)"
        names[2 * i + 1] = f"{label} ends"
    for slot, op in enumerate(gemm_ops):
        names[WEIGHT_SLOT + slot] = f"GEMM {op} weight slice landed"
        for k, phase in enumerate(GEMM_PHASES):
            names[GEMM_SLOT + len(GEMM_PHASES) * slot + k] = f"GEMM {op}: {phase}"
    return names


def block_times(stamps: np.ndarray) -> np.ndarray:
    """µs since the first block's start, [blocks, slots] (NaN where a block stamped nothing) for one launch's stamps
    [blocks, slots, 2] (globaltimer ns, clock64). A block's phases are timed by its clock64 at its own rate, and
    placed by its start on the globaltimer."""
    ns = stamps[:, :, 0].astype(np.float64)
    cycles = stamps[:, :, 1].astype(np.float64)
    stamped = ns > 0
    out = np.full(ns.shape, np.nan)
    starts = ns[:, 0][stamped[:, 0]]
    if starts.size == 0:
        return out
    origin = starts.min()
    for b in range(ns.shape[0]):
        if not stamped[b, 0]:
            continue
        mine = np.flatnonzero(stamped[b])
        last = mine[np.argmax(ns[b, mine])]
        span_ns, span_cycles = ns[b, last] - ns[b, 0], cycles[b, last] - cycles[b, 0]
        rate = span_cycles / span_ns if span_ns > 0 and span_cycles > 0 else None  # cycles per ns
        for s in mine:
            since = (cycles[b, s] - cycles[b, 0]) / rate if rate else ns[b, s] - ns[b, 0]
            out[b, s] = (ns[b, 0] - origin + since) / 1000.0
    return out


def phase_table(launches: list[np.ndarray], names: dict[int, str]) -> list[dict]:
    """Per named phase that some block stamped: earliest, median and latest block (µs since the first block's start),
    each the median over launches, and how many blocks stamped it."""
    times = np.stack([block_times(stamps) for stamps in launches])  # [launches, blocks, slots]
    rows = []
    for slot in sorted(names):
        per_launch = times[:, :, slot]
        seen = ~np.isnan(per_launch)
        if not seen.any():
            continue
        with np.errstate(all="ignore"):
            earliest = np.nanmedian(np.nanmin(np.where(seen, per_launch, np.nan), axis=1))
            median = np.nanmedian(np.nanmedian(per_launch, axis=1))
            latest = np.nanmedian(np.nanmax(per_launch, axis=1))
        rows.append({"slot": slot, "phase": names[slot], "blocks": int(seen.sum(axis=1).max()),
                     "earliest_us": round(float(earliest), 2), "median_us": round(float(median), 2),
                     "latest_us": round(float(latest), 2)})
    return sorted(rows, key=lambda row: (row["median_us"], row["slot"]))


def parts(rows: list[dict], graph_us: "float | None") -> list[dict]:
    """The kernel's time cut into its start, its stages and the grid barriers between them, from a phase table:
    a stage runs from its start (median block) to its end (median and latest block); a barrier from the latest block
    ending the stage before to the median block starting the next; what follows the latest block's last end, up to
    the graph replay's time, no stamp sees."""
    at = {row["slot"]: row for row in rows}
    if 0 not in at or 1 not in at:
        return []
    out = [{"part": "start (kernel start → its weight copies issued)", "from_us": at[0]["median_us"],
            "median_us": at[1]["median_us"], "latest_us": at[1]["latest_us"]}]
    begin, last_end = at[1]["median_us"], at[1]["latest_us"]
    stage = 1
    while 2 * stage + 1 in at:
        end = at[2 * stage + 1]
        label = end["phase"].removesuffix(" ends")
        if stage > 1 and 2 * stage in at:
            begin = at[2 * stage]["median_us"]
            out.append({"part": f"grid barrier before {label}", "from_us": last_end, "median_us": begin,
                        "latest_us": begin})
        out.append({"part": label, "from_us": begin, "median_us": end["median_us"], "latest_us": end["latest_us"]})
        out += [{"part": f"· {row['phase']}", "from_us": begin, "median_us": row["median_us"],
                 "latest_us": row["latest_us"]} for row in _inside(rows, label)]
        last_end = end["latest_us"]
        stage += 1
    if graph_us is not None:
        out.append({"part": "outside the stamps (launch, the kernel's end, the graph)", "from_us": last_end,
                    "median_us": round(graph_us, 2), "latest_us": round(graph_us, 2)})
    for part in out:
        part["us"] = (round(part["median_us"] - part["from_us"], 2), round(part["latest_us"] - part["from_us"], 2))
    return out


def _inside(rows: list[dict], stage_label: str) -> list[dict]:
    """The stamps of the GEMMs inside a stage ("stage i (first–last)"): their weights landing and their steps."""
    found = re.search(r"\((\d+)(?:–(\d+))?\)", stage_label)
    first = int(found.group(1))
    ops = range(first, int(found.group(2) or first) + 1)
    inside = [row for row in rows if row["slot"] >= WEIGHT_SLOT and
              (m := re.match(r"GEMM (\d+)[ :]", row["phase"])) and int(m.group(1)) in ops]
    return sorted(inside, key=lambda row: (row["median_us"], row["slot"]))


def markdown(title: str, rows: list[dict], graph_us: "float | None") -> str:
    lines = [f"# {title}", ""]
    if graph_us is not None:
        lines += [f"Graph replay of the plan: {graph_us:.1f} µs (median, CUDA events, L2 warm).", ""]
    lines += ["| phase | blocks | earliest µs | median µs | latest µs |", "|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['blocks']} | {r['earliest_us']:.2f} | {r['median_us']:.2f} | {r['latest_us']:.2f} |"
              for r in rows]
    cut = parts(rows, graph_us)
    if cut:
        lines += ["", "Parts (a stage to its median and its latest block's end; a barrier from the latest block's end "
                  "before it):", "", "| part | from µs | µs (median block) | µs (latest block) |",
                  "|---|---|---|---|"]
        lines += [f"| {c['part']} | {c['from_us']:.2f} | {c['us'][0]:.2f} | {c['us'][1]:.2f} |" for c in cut]
    return "\n".join(lines) + "\n"


def run_case(shape: str, mask: int, dtype: str, launches: int) -> tuple[list[dict], float, str]:
    import torch

    from fusionsearch.mask import decode
    from fusionsearch.schedule import resident_weight_ops, resident_weight_stages
    from fusionsearch.timing import time_cuda_graph

    resident = [seg for seg in decode(mask).segments if resident_weight_stages(seg)]
    if len(resident) != 1:
        raise SystemExit(f"phase_clock: plan {mask} has {len(resident)} segments with a resident-weight kernel; "
                         "give a plan with exactly one (e.g. 32768)")
    stages = resident_weight_stages(resident[0])
    names = phase_names([stage.ops for stage in stages], list(resident_weight_ops(stages)))
    case = PreparedPlan(shape, mask, dtype)
    if not case.budget.ok:
        raise SystemExit(f"phase_clock: plan {mask} at {shape} {dtype} failed its check against fp32 "
                         f"(error {case.budget.candidate_error:.2e} > {case.budget.limit:.2e})")
    region = case.tensors["splitk_partials"][-PHASE_FLOATS:]

    def run() -> None:
        case.run(case.layer.kernel_ids)

    graph_us = time_cuda_graph(run)["median"]
    run()  # once outside the capture: a first launch sets the kernels' attributes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    stamps = []
    for _ in range(launches):
        region.zero_()
        graph.replay()
        torch.cuda.synchronize()
        stamps.append(region.view(torch.int64).cpu().numpy().reshape(256, SLOTS, 2))
    if not any((s[:, 0, 0] > 0).any() for s in stamps):
        raise SystemExit("phase_clock: no block stamped a clock; apply experiments/patches/"
                         "probe-resident-phase-clock.patch first")
    title = f"Phases of plan {mask}'s resident-weight kernel at {shape}, {dtype} ({launches} launches)"
    return phase_table(stamps, names), graph_us, title


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[("1x32", 32768)], help="SHAPE:MASK pairs")
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=["fp16", "bf16"])
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.launches < 1:
        parser.error(f"--launches {args.launches}: give at least 1")
    for shape, mask in args.cases:
        for dtype in args.dtypes:
            rows, graph_us, title = run_case(shape, mask, dtype, args.launches)
            text = markdown(title, rows, graph_us)
            print(text, flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"phase-{shape}-{dtype}.md").write_text(text)
                (args.out / f"phase-{shape}-{dtype}.json").write_text(json.dumps(
                    {"shape": shape, "mask": mask, "dtype": dtype, "graph_us": graph_us, "phases": rows},
                    indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
