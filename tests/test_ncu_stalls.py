"""experiments/ncu_stalls.py on a small ncu source export: totals by reason, phases cut at barriers, top lines."""
from __future__ import annotations

import csv
from pathlib import Path

from experiment_scripts import load_experiment


def _export(path: Path) -> None:
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_barrier", "stall_no_inst",
              "stall_barrier (Not Issued)"]
    rows = [("0x10", "LDG.E.128 R4, desc[UR4][R2.64]", 10, 0, 10, 0),
            ("0x20", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x100], R8", 0, 0, 0, 0),
            ("0x30", "HMMA.16816.F32 R8, R12, R16, R8", 30, 0, 30, 0),
            ("0x40", "@P0 ATOM.E.ADD.STRONG.GPU PT, R7, desc[UR8][R4.64+0x4], R7", 0, 0, 0, 0),
            ("0x50", "LDC.64 R16, c[0x0][0x210]", 60, 60, 0, 7)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "fs_seg_00_14_fa_fp16_sm90_0_resident"])
        writer.writerow(header)
        writer.writerows(rows)


def test_phases_are_cut_at_weight_waits_and_barriers(tmp_path, capsys, monkeypatch):
    export = tmp_path / "sass.csv"
    _export(export)
    monkeypatch.setattr("sys.argv", ["ncu_stalls.py", str(export), "--top", "2"])
    assert load_experiment("ncu_stalls").main() == 0
    out = capsys.readouterr().out
    assert "5 instructions, 100 samples" in out
    assert "by reason: barrier 60%, no_inst 40%" in out
    phases = [line.split()[-3:] for line in out.split("phase (ends at)")[1].split("top 2")[0].strip().splitlines()[1:]]
    assert phases == [["10.0%", "no_inst", "100%"], ["30.0%", "no_inst", "100%"], ["60.0%", "barrier", "100%"]]
    top = out.split("top 2 instructions")[1].strip().splitlines()
    assert top[0].startswith("0x50 60.0%") and top[0].endswith("barrier") and "HMMA" in top[1]


def test_executed_instructions_are_counted_by_opcode(tmp_path, capsys, monkeypatch):
    export = tmp_path / "sass.csv"
    with open(export, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_math"])
        writer.writerows([("0x10", "HMMA.16816.F32 R8, R12, R16, R8", 5, "3,000", 5),
                          ("0x20", "@!P1 HMMA.16816.F32 R4, R12, R18, R4", 3, "1,000", 3),
                          ("0x30", "FADD.FTZ R1, R2, R3", 2, "4000", 2)])
    monkeypatch.setattr("sys.argv", ["ncu_stalls.py", str(export), "--top", "3"])
    assert load_experiment("ncu_stalls").main() == 0
    out = capsys.readouterr().out
    assert "executed: 8000 warp instructions" in out
    mix = out.split("by opcode")[1].strip().splitlines()
    assert [line.split()[0] for line in mix] == ["HMMA", "FADD"]
    assert mix[0].split()[1:] == ["4000", "50.0%"]
