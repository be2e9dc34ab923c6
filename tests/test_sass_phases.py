"""experiments/sass_phases.py on a small nvdisasm listing: kernels by section, phases cut where ncu_stalls.py cuts
them, the report, and clear errors for an ambiguous kernel pattern or a missing nvdisasm."""
from __future__ import annotations

import pytest
from experiment_scripts import load_experiment


LISTING = """
\t.section\t.text.fs_seg_00_14_fa_fp16_sm90a_1234_resident,"ax",@progbits
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/                   IABS R4, R2 ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6+0x12200], R8 ;
        /*0030*/                   HMMA.16816.F32 R8, R12, R16, R8 ;
        /*0040*/               @P1 ATOM.E.ADD.STRONG.GPU PT, R9, desc[UR8][R6.64+0x4], R9 ;
        /*0050*/                   FFMA.FTZ R3, R4, R5, R3 ;
        /*0060*/              @!P0 FFMA.FTZ R3, R4, R5, R3 ;
        /*0070*/                   EXIT ;
\t.section\t.text.fs_seg_00_14_fa_fp16_sm90a_1234,"ax",@progbits
        /*0000*/                   EXIT ;
"""


def test_kernels_are_split_by_section_and_phases_at_weight_waits_and_barriers():
    sass = load_experiment("sass_phases")
    found = sass.kernels(LISTING)
    assert sorted(found) == ["fs_seg_00_14_fa_fp16_sm90a_1234", "fs_seg_00_14_fa_fp16_sm90a_1234_resident"]
    code = found[sass.pick(found, "resident$")]
    assert len(code) == 8 and code[-1] == (0x70, "EXIT")
    phases = sass.phases(code)
    assert [(p.start, p.end, p.instructions) for p in phases] == [(0x00, 0x30, 3), (0x30, 0x50, 2), (0x50, 0x80, 3)]
    assert phases[0].mark.startswith("SYNCS.PHASECHK") and phases[1].mark.startswith("@P1 ATOM.E.ADD.STRONG.GPU")
    assert phases[2].opcodes == {"FFMA.FTZ": 2, "EXIT": 1}  # predicates are not part of the opcode
    report = sass.report("k", code, top=2).splitlines()
    assert report[0] == "k: 128 bytes, 8 instructions"
    assert "37.5%" in report[3] and "FFMA.FTZ:2" in report[5]


def test_an_ambiguous_kernel_pattern_and_a_missing_nvdisasm_are_explained(monkeypatch, tmp_path):
    sass = load_experiment("sass_phases")
    with pytest.raises(SystemExit, match="matches 2 of: .*give one that matches exactly one kernel"):
        sass.pick(sass.kernels(LISTING), "fs_seg")
    monkeypatch.setenv("NVDISASM", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sass.Path, "glob", lambda self, pattern: iter(()))  # no pip wheel either
    with pytest.raises(SystemExit, match="nvdisasm not found.*nvidia-cuda-nvdisasm.*NVDISASM"):
        sass.nvdisasm()
