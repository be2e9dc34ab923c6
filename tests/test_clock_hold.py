"""experiments/clock_hold.py: reading nvidia-smi's clock, power and event-reason samples (no GPU needed)."""
from __future__ import annotations

import subprocess
import sys
import time

from experiment_scripts import load_experiment


def _fake_sampler(text: str) -> subprocess.Popen:
    """A process that prints what nvidia-smi would, then idles until it is terminated, as the sampler does."""
    script = f"import sys, time; sys.stdout.write({text!r}); sys.stdout.flush(); time.sleep(30)"
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_samples_are_parsed_and_unreadable_lines_skipped():
    clock_hold = load_experiment("clock_hold")
    proc = _fake_sampler("1980, 352.10, 0x0000000000000000\n"
                         "[N/A], 410.00, 0x0000000000000004\n"
                         "1365, 699.50, 0x0000000000000004\n"
                         "garbage\n")
    time.sleep(1.0)  # let it print before it is stopped
    samples = clock_hold._read_samples(proc)
    assert samples == [(1980.0, 352.1, 0), (1365.0, 699.5, 4)]
    assert proc.returncode is not None  # stopped, not left running


def test_the_query_asks_for_clock_power_and_reasons_in_that_order():
    # _read_samples reads the fields by position.
    assert load_experiment("clock_hold").QUERY.split(",") == ["clocks.sm", "power.draw", "clocks_event_reasons.active"]


def test_segment_bench_prints_a_held_row_with_or_without_clock_samples():
    bench = load_experiment("segment_bench")
    held = {"us_per_call": 306.87, "sm_mhz": 1425.0, "sm_mhz_min": 1155.0, "power_w": 698.4, "event_reasons": "0x4"}
    assert bench.hold_text(held) == "  held: 306.9 µs at 1425 MHz (min 1155), 698 W, reasons 0x4"
    assert bench.hold_text({**held, "sm_mhz": None}) == "  held: 306.9 µs (no clock samples)"
    assert bench.hold_text(None) == ""
