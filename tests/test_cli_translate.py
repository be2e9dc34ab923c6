"""`fusionsearch translate`: in-process through cli.main and as `python -m fusionsearch` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusionsearch
from fusionsearch.cli import main
from fusionsearch.ops import OPS


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m fusionsearch ARGS` on the same fusionsearch the tests import, outside the source tree."""
    env = dict(os.environ, PYTHONPATH=str(Path(fusionsearch.__file__).resolve().parent.parent))
    return subprocess.run([sys.executable, "-m", "fusionsearch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mask", ["0001101010101010", "6826", "0x1aaa", "0b1101010101010"])
def test_seed_format_is_exact_for_every_written_form(mask, capsys):
    assert main(["translate", mask, "--format", "seed"]) == 0
    assert capsys.readouterr().out == "6826 0 2 1 2 3 4\n"


def test_second_worked_example_in_seed_format(capsys):
    assert main(["translate", "0000010101010101", "--format", "seed"]) == 0
    assert capsys.readouterr().out == "1365 0 1 1 4\n"


def test_json_output_parses_and_describes_the_plan(capsys):
    assert main(["translate", "1001101010101010", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mask"] == 0b1001101010101010 and data["attention"] is True
    assert [s["first_op"] for s in data["segments"]][:3] == [0, 2, 6]
    assert data["segments"][1]["attention_kernel"] is True
    assert data["kernel_count"] == len(data["segments"]) == 11


def test_table_lists_operator_names_and_marks_the_attention_kernel(capsys):
    assert main(["translate", "1001101010101010"]) == 0
    out = capsys.readouterr().out
    assert all(op.name in out for op in OPS)
    attention_rows = [line for line in out.splitlines() if "attention" in line and "qk_gemm" in line]
    assert len(attention_rows) == 1 and attention_rows[0].startswith("3–6")
    assert "11 kernels" in out


def test_table_without_attention_flag_marks_no_attention_kernel(capsys):
    assert main(["translate", "0001101010101010"]) == 0
    out = capsys.readouterr().out
    assert "attention kernel: off" in out and "hand-written attention" not in out


@pytest.mark.parametrize("bad", ["65536", "-1", "12x", "11111111111111111", "0xfffff"])
def test_bad_mask_exits_2_with_one_line_naming_it(bad, capsys):
    assert main(["translate", bad]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and repr(bad) in lines[0] and lines[0].startswith("fusionsearch translate: error:")


def test_help_describes_the_formats(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["translate", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--format" in out and "seed" in out


def test_python_dash_m_translate_prints_the_seed(tmp_path):
    result = run_module("translate", "0001101010101010", "--format", "seed", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "6826 0 2 1 2 3 4\n", "")


def test_python_dash_m_bad_mask_exits_2_without_traceback(tmp_path):
    result = run_module("translate", "banana", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "'banana'" in result.stderr


def test_python_dash_m_help_lists_translate(tmp_path):
    result = run_module("--help", cwd=tmp_path)
    assert result.returncode == 0 and "translate" in result.stdout
