"""The few-row GEMM probe (experiments/skinny_probe/): it builds with nvcc against the kernel headers, so it keeps
timing the tiles that the segment kernels use."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fusionsearch.resources import kernels_dir

PROBE = Path(__file__).resolve().parents[1] / "experiments" / "skinny_probe" / "skinny_gemm.cu"


@pytest.mark.nvcc
@pytest.mark.slow
def test_probe_builds_for_sm90a_with_tensor_core_code(tmp_path):
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "-arch=sm_90a", f"-I{kernels_dir()}",
                             "--keep", f"--keep-dir={tmp_path}", str(PROBE), "-o", str(tmp_path / "probe")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert "mma.sync.aligned.m16n8k16" in ptx
    assert (tmp_path / "probe").stat().st_size > 0
