"""Where a kernel's warps wait, from an ncu source export: stall samples by reason, by phase, and the top instructions.
With the export's executed-instruction counts (ncu's SourceCounters section), also the executed instructions by
opcode: two kernels that issue at the same rate differ in time by what they execute.

    ncu -k regex:NAME -c 1 --section WarpStateStats --section SourceCounters -o report python ...
    ncu --import report.ncu-rep --page source --csv --print-source sass > sass.csv
    python experiments/ncu_stalls.py sass.csv [--top 15]

Phases are cut at the grid barriers of a persistent segment kernel (the `ATOM...STRONG.GPU` of each barrier arrival)
and at the weight waits of resident-weight kernels (`SYNCS.PHASECHK`), in address order, which follows the stages.
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
PHASE_MARKS = ("ATOM.E.ADD.STRONG.GPU", "SYNCS.PHASECHK")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def read(path: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(path, newline="")))
    header = next(i for i, row in enumerate(rows) if "Source" in row and SAMPLES in row)
    return rows[header], [row for row in rows[header + 1:] if len(row) == len(rows[header])]


def opcode(instruction: str) -> str:
    """'@!P0 HMMA.16816.F32 R8, …' → 'HMMA.16816.F32': the predicate dropped ('?' for an empty line)."""
    words = PREDICATE.sub("", instruction.strip()).split()
    return words[0] if words else "?"


def executed_by_opcode(header: list[str], rows: list[list[str]]) -> Counter:
    """Warp-level instructions executed per opcode without its modifiers (ncu writes counts with thousands
    separators)."""
    src, executed = header.index("Source"), header.index(EXECUTED)
    mix = Counter()
    for row in rows:
        mix[opcode(row[src]).split(".")[0]] += float(row[executed].replace(",", "") or 0)
    return mix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    header, rows = read(args.csv)
    src, samples = header.index("Source"), header.index(SAMPLES)
    reasons = [i for i, name in enumerate(header) if name.startswith("stall_") and "Not Issued" not in name]
    value = lambda row, i: float(row[i] or 0)  # noqa: E731
    total = sum(value(row, samples) for row in rows)
    by_reason = Counter()
    for row in rows:
        for i in reasons:
            by_reason[header[i]] += value(row, i)
    print(f"{len(rows)} instructions, {total:.0f} samples")
    print("by reason: " + ", ".join(f"{name[6:]} {count / total:.0%}" for name, count in by_reason.most_common(6)))

    print("\nphase (ends at)                                          samples  share  top reason")
    phase, start = Counter(), None
    for row in rows:
        start = start or row[0]
        for i in reasons:
            phase[header[i]] += value(row, i)
        if any(mark in row[src] for mark in PHASE_MARKS) or row is rows[-1]:
            count = sum(phase.values())
            if count:
                reason, top = phase.most_common(1)[0]
                print(f"{row[0][-6:]} {row[src].strip()[:48]:48s} {count:7.0f} {count / total:6.1%}  "
                      f"{reason[6:]} {top / count:.0%}")
            phase, start = Counter(), None

    print(f"\ntop {args.top} instructions")
    for row in sorted(rows, key=lambda r: -value(r, samples))[:args.top]:
        reason = max(reasons, key=lambda i: value(row, i))
        print(f"{row[0][-6:]} {value(row, samples) / total:5.1%}  {row[src].strip()[:60]:60s} {header[reason][6:]}")

    if EXECUTED in header:
        mix = executed_by_opcode(header, rows)
        executed = sum(mix.values())
        print(f"\nexecuted: {executed:.4g} warp instructions; by opcode")
        for name, count in mix.most_common(args.top):
            print(f"{name:12s} {count:12.4g} {count / executed:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
