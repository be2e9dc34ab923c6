"""experiments/phase_clock.py's arithmetic on synthetic stamps: names of the phases, per-block times, the table."""
from __future__ import annotations

import numpy as np
import pytest

from experiment_scripts import load_experiment


def _stamps(blocks: dict[int, dict[int, tuple[int, int]]]) -> np.ndarray:
    raw = np.zeros((256, load_experiment("phase_clock").SLOTS, 2), dtype=np.int64)
    for block, phases in blocks.items():
        for slot, (ns, cycles) in phases.items():
            raw[block, slot] = (ns, cycles)
    return raw


def test_phase_names_follow_the_resident_stages():
    names = load_experiment("phase_clock").phase_names([(0, 1), (2, 3, 4, 5, 6), (12, 13, 14)], [0, 12])
    assert names[0] == "kernel start" and names[1] == "the start's weight copies issued"
    assert names[3] == "stage 1 (0–1) ends" and 2 not in names
    assert names[4] == "stage 2 (2–6) starts (grid barrier passed)" and names[7] == "stage 3 (12–14) ends"
    assert names[24] == "GEMM 0 weight slice landed" and names[25] == "GEMM 12 weight slice landed"
    assert names[20] == "slices read, weight barriers armed" and names[21] == "start's block barrier passed"
    assert names[22] == "first GEMM's weight copy issued (thread 0)"
    assert names[32] == "GEMM 0: thread 0's A in and its sums written" and names[33] == "GEMM 0: every warp's sums in"
    assert names[38] == "GEMM 12: thread 0's results stored" and names[39] == "GEMM 12: this split's arrival counted"
    assert max(names) < load_experiment("phase_clock").SLOTS


def test_phase_names_refuse_stages_that_would_reach_the_starts_slots():
    phase_clock = load_experiment("phase_clock")
    assert len(phase_clock.phase_names([(op,) for op in range(9)], [0])) == 2 + 3 + 2 * 8 + 1 + 1 + 4
    with pytest.raises(ValueError, match="10 stages need slots up to 21"):
        phase_clock.phase_names([(op,) for op in range(10)], [0])


def test_block_times_use_each_blocks_cycles_at_its_own_rate_and_its_start_on_the_globaltimer():
    phase_clock = load_experiment("phase_clock")
    # Block 1 starts 1 µs after block 0; both run at 2 cycles per ns. Block 0's globaltimer ticks coarsely (its
    # stamp for slot 3 reads 8,000 ns although 2,000 ns passed by its cycles), block 1 stamps no slot 3.
    stamps = _stamps({0: {0: (10_000, 100), 3: (18_000, 4_100), 5: (30_000, 40_100)},
                      1: {0: (11_000, 500), 5: (31_000, 40_500)}})
    times = phase_clock.block_times(stamps)
    assert times[0, 0] == 0.0 and times[1, 0] == pytest.approx(1.0)
    assert times[0, 3] == pytest.approx(2.0)  # 4,000 cycles at 2 per ns
    assert times[0, 5] == pytest.approx(20.0) and times[1, 5] == pytest.approx(21.0)
    assert np.isnan(times[1, 3]) and np.isnan(times[2, 0])


def test_phase_table_orders_phases_by_time_and_takes_the_median_over_launches():
    phase_clock = load_experiment("phase_clock")
    names = {0: "kernel start", 3: "stage 1 (0) ends", 5: "stage 2 (1) ends", 24: "GEMM 0 weight slice landed"}
    # Two cycles per ns in both blocks; stage 2 ends 1 µs later in each launch than in the one before.
    launches = [_stamps({0: {0: (1, 1), 24: (1_001, 2_001), 3: (3_001, 6_001), 5: (5_001 + late, 10_001 + 2 * late)},
                         1: {0: (501, 1), 3: (4_001, 7_001), 5: (6_001 + late, 11_001 + 2 * late)}})
                for late in (0, 1_000, 2_000)]
    rows = phase_clock.phase_table(launches, names)
    assert [row["phase"] for row in rows] == ["kernel start", "GEMM 0 weight slice landed", "stage 1 (0) ends",
                                              "stage 2 (1) ends"]
    start, weights, stage1, stage2 = rows
    assert (start["earliest_us"], start["latest_us"], start["blocks"]) == (0.0, 0.5, 2)
    assert weights["blocks"] == 1 and weights["median_us"] == 1.0
    assert (stage1["earliest_us"], stage1["latest_us"]) == (3.0, 4.0)
    assert (stage2["earliest_us"], stage2["latest_us"]) == (6.0, 7.0)  # the middle launch of 5, 6, 7 and 6, 7, 8
    table = phase_clock.markdown("t", rows, 26.7)
    assert "Graph replay of the plan: 26.7 µs" in table and "| stage 2 (1) ends | 2 | 6.00 | 6.50 | 7.00 |" in table


def test_a_case_without_a_mask_is_refused(monkeypatch):
    monkeypatch.setattr("sys.argv", ["phase_clock.py", "--cases", "1x32"])
    with pytest.raises(SystemExit) as exit_info:
        load_experiment("phase_clock").main()
    assert exit_info.value.code == 2


def test_parts_cut_the_kernel_into_its_start_stages_barriers_and_what_no_stamp_sees():
    phase_clock = load_experiment("phase_clock")

    def row(slot, phase, median, latest):
        return {"slot": slot, "phase": phase, "blocks": 2, "earliest_us": median, "median_us": median,
                "latest_us": latest}

    rows = [row(0, "kernel start", 0.0, 0.2), row(1, "the start's weight copies issued", 2.0, 3.0),
            row(3, "stage 1 (0–1) ends", 5.0, 6.0), row(4, "stage 2 (2–6) starts (grid barrier passed)", 7.0, 7.5),
            row(5, "stage 2 (2–6) ends", 8.0, 9.5), row(24, "GEMM 0 weight slice landed", 2.5, 3.5)]
    cut = {c["part"]: c for c in phase_clock.parts(rows, 12.0)}
    assert list(cut) == ["start (kernel start → its weight copies issued)", "stage 1 (0–1)",
                         "· GEMM 0 weight slice landed", "grid barrier before stage 2 (2–6)", "stage 2 (2–6)",
                         "outside the stamps (launch, the kernel's end, the graph)"]
    assert cut["stage 1 (0–1)"]["us"] == (3.0, 4.0)  # from the copies issued (median) to its median / latest end
    assert cut["grid barrier before stage 2 (2–6)"]["us"] == (1.0, 1.0)  # the latest end 6.0 → the median start 7.0
    assert cut["stage 2 (2–6)"]["us"] == (1.0, 2.5)
    assert cut["outside the stamps (launch, the kernel's end, the graph)"]["us"] == (2.5, 2.5)
    assert phase_clock.parts(rows[2:], 12.0) == []  # no start stamps, no parts
    # The stamps of a stage's GEMMs follow it, timed from the stage's start.
    rows.append(row(32, "GEMM 0: thread 0's A in and its sums written", 4.0, 4.5))
    order = [c["part"] for c in phase_clock.parts(rows, 12.0)]
    assert order[1:4] == ["stage 1 (0–1)", "· GEMM 0 weight slice landed",
                          "· GEMM 0: thread 0's A in and its sums written"]
    assert phase_clock.parts(rows, 12.0)[3]["us"] == (2.0, 2.5)
    assert "| grid barrier before stage 2 (2–6) | 6.00 | 1.00 | 1.00 |" in phase_clock.markdown("t", rows, 12.0)
