"""The CUTLASS probe (experiments/cutlass_probe/): a configuration unit compiles for sm_90a with warpgroup MMA and
TMA, and unknown configuration names are refused with the known ones."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from experiment_scripts import load_experiment

from fusionsearch.resources import cutlass_include_dirs, kernels_dir

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "experiments" / "cutlass_probe"


@pytest.mark.nvcc
@pytest.mark.slow
def test_pingpong_unit_compiles_for_sm90a_with_warpgroup_mma(tmp_path):
    probe = load_experiment("cutlass_probe")
    [unit] = probe.write_units(["pp_128x128_c1x1"], tmp_path / "units")
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-cubin", "--expt-relaxed-constexpr",
                             "-gencode=arch=compute_90a,code=sm_90a", f"-I{PROBE}", f"-I{kernels_dir()}",
                             *(f"-I{d}" for d in cutlass_include_dirs()), "--keep", f"--keep-dir={tmp_path}",
                             str(unit), "-o", str(tmp_path / "unit.cubin")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert "wgmma.mma_async" in ptx, "the mainloop must use Hopper warpgroup MMA"
    assert "cp.async.bulk.tensor" in ptx, "operands must arrive by TMA"
    assert (tmp_path / "units" / "configs.inc").read_text() == "PROBE_CONFIG(pp_128x128_c1x1)\n"


def test_every_configuration_renders_a_unit_and_unknown_names_are_refused(tmp_path):
    probe = load_experiment("cutlass_probe")
    for name, ((tm, tn, tk), _, schedule, scheduler, *epilogue_tile) in probe.CONFIGS.items():
        source = probe.config_unit(name)
        assert f"PROBE_DEFINE({name}, fs::sm90::Config<cute::Shape<cute::_{tm}, cute::_{tn}, cute::_{tk}>" in source
        tail = "".join(f", cute::Shape<cute::_{m}, cute::_{n}>" for m, n in epilogue_tile)
        assert f"fs::sm90::{schedule}, cutlass::gemm::{scheduler}{tail}>" in source
    assert "cutlass::gemm::PersistentScheduler, cute::Shape<cute::_64, cute::_64>>" in probe.config_unit(
        "pp_128x128_c1x1_e64x64")  # FFN1's tiles from 8192 rows (fs::sm90::PingpongFfn1Config)
    with pytest.raises(SystemExit, match="unknown configuration.*pp_1x1.*known: coop_128x256_c2x1"):
        probe.write_units(["pp_128x128_c1x1", "pp_1x1"], tmp_path)


def test_committed_probe_runs_render_both_tables():
    probe = load_experiment("cutlass_probe")
    result = json.loads((ROOT / "experiments" / "results" / "cutlass-probe-h100.json").read_text())
    text = probe.markdown(result)
    assert text.count("| plain |") == 12  # four GEMMs at three row counts
    assert "| ffn2 | 32768×768×3072 | bias_residual |" in text
    segment_table = text[text.index("The configurations the segments use"):]
    rows = [line.split(" | ") for line in segment_table.splitlines() if line.startswith(("| attn_out |", "| ffn2 |"))]
    assert len(rows) == 4  # 8192 and 32768 rows; run A did not build the configurations 2048 rows run now
    for gemm, m, epilogue, config, *_ in rows:
        assert (epilogue, config) == probe.segment_config(gemm[2:], int(m))
    assert probe.segment_config("attn_out", 1024) == ("bias_residual", "pp_64x96_c1x1")
    assert probe.segment_config("attn_out", 2048)[1] == "coop_128x96_c1x1"  # from 2048 to 4095 rows
    assert probe.segment_config("attn_out", 8192)[1] == "pp_128x128_c1x1"
    assert probe.segment_config("ffn1", 1024) == ("bias_gelu_lean", "coop_128x192_c2x1")
    assert probe.segment_config("ffn1", 4096) == ("bias_gelu_lean", "coop_128x256_c2x1")
    assert probe.segment_config("ffn1", 8192) == ("bias_gelu_lean", "pp_128x128_c1x1_e64x64")
    assert probe.segment_config("ffn1", 128) == ("bias_gelu_lean", "pp_64x64_c1x1")
    assert probe.segment_config("ffn1", 64) == (None, None)  # the resident-weight kernel serves up to 64 rows


def test_the_switch_rows_runs_render_only_rows_the_segments_serve_with_their_configurations():
    probe = load_experiment("cutlass_probe")
    result = json.loads((ROOT / "experiments" / "results" / "cutlass-probe-1024-2048-h100.json").read_text())
    segment_table = probe.markdown(result).split("The configurations the segments use")[1]
    rows = [line.split(" | ") for line in segment_table.splitlines() if line.startswith("| ") and "---" not in line]
    served = sorted((gemm[2:], int(m)) for gemm, m, *_ in rows[1:])
    # FFN1's segment rows need the lean GELU epilogue, which runs before it existed did not measure.
    assert served == sorted((g, m) for g in ("attn_out", "ffn2") for m in (1024, 2048))
    for gemm, m, epilogue, config, *_ in rows[1:]:
        assert (epilogue, config) == probe.segment_config(gemm[2:], int(m))


def test_the_few_rows_run_renders_every_gemm_and_the_segments_at_128_rows():
    probe = load_experiment("cutlass_probe")
    result = json.loads((ROOT / "experiments" / "results" / "cutlass-probe-32-128-h100.json").read_text())
    tables = probe.markdown(result).split("The configurations the segments use")
    assert tables[0].count("| plain |") == 8  # four GEMMs at 32 and 128 rows
    rows = [line.split(" | ") for line in tables[1].splitlines() if line.startswith("| ") and "---" not in line]
    # FFN1's segment row needs the lean GELU epilogue, which this run predates.
    assert sorted((gemm[2:], int(m)) for gemm, m, *_ in rows[1:]) == [("attn_out", 128), ("ffn2", 128)]
