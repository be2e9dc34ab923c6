"""The CUTLASS probe (experiments/cutlass_probe/): its GEMM header compiles for sm_90a with warpgroup MMA, and the
script names the missing headers clearly."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "experiments" / "cutlass_probe"


def _probe_script():
    spec = importlib.util.spec_from_file_location("cutlass_probe", ROOT / "experiments" / "cutlass_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.nvcc
@pytest.mark.slow
def test_bias_gelu_gemm_compiles_for_sm90a_with_warpgroup_mma(tmp_path):
    pytest.importorskip("cutlass_library", reason="needs the nvidia-cutlass headers (the cutlass extra)")
    includes = _probe_script().cutlass_include_dirs()
    unit = tmp_path / "bias_gelu.cu"
    unit.write_text('#include "gemm_epilogue.cuh"\n'
                    "template probe::Launch probe::launch<probe::BiasGelu>(int, int, int, const void*, const void*, "
                    "const void*, const void*, void*, void*, cudaStream_t);\n")
    cubin = tmp_path / "unit.cubin"
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-cubin", "--expt-relaxed-constexpr",
                             "-gencode=arch=compute_90a,code=sm_90a", f"-I{PROBE}", *(f"-I{d}" for d in includes),
                             "--keep", f"--keep-dir={tmp_path}", str(unit), "-o", str(cubin)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert "wgmma.mma_async" in ptx, "the mainloop must use Hopper warpgroup MMA"
    assert "cp.async.bulk.tensor" in ptx, "operands must arrive by TMA"


def test_missing_cutlass_headers_name_the_extra(monkeypatch):
    probe = _probe_script()
    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"fusionsearch\[cutlass\]"):
        probe.cutlass_include_dirs()
