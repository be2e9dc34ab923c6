"""experiments/device_call.py without a GPU: which steps fit the time left, which variant goes on, bad input."""
from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from experiment_scripts import load_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_steps_run_in_order_while_they_fit_and_a_shorter_later_one_still_runs():
    call = load_experiment("device_call")
    estimates = {"ab": 100, "build": 200, "kernels": 40, "harness": 300, "report": 400}
    steps = ["ab", "build", "kernels", "harness", "report"]
    assert call.plan(steps, 2000, estimates) == steps
    # 100 + 200 + 40 leave 260 - the harness (300) and the report (400) do not fit.
    assert call.plan(steps, 600, estimates) == ["ab", "build", "kernels"]
    assert call.plan(["report", "kernels"], 300, estimates) == ["kernels"]
    assert call.plan(steps, call.MARGIN + 39, estimates) == []


def test_the_kept_variant_with_the_largest_gain_goes_on():
    call = load_experiment("device_call")
    verdict = {"a": {"keep": True, "kernel_change_pct": -1.2}, "b": {"keep": True, "kernel_change_pct": -1.4},
               "c": {"keep": False, "kernel_change_pct": -3.0}}
    assert call.kept_variant(verdict) == "b"
    assert call.kept_variant({"c": verdict["c"]}) is None


def test_steps_that_do_not_fit_are_skipped_and_the_results_still_packed(tmp_path):
    out, tar = tmp_path / "call", tmp_path / "call.tgz"
    result = subprocess.run([sys.executable, "experiments/device_call.py", "--limit", "30", "--out", str(out),
                             "--tar", str(tar), "--steps", "harness", "report"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "harness: skipped" in result.stdout and "report: skipped" in result.stdout
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["harness", "report"] and all(s["skipped"] for s in steps)
    with tarfile.open(tar) as packed:
        assert "call/steps.json" in packed.getnames()


def test_an_earlier_calls_files_in_the_output_folder_are_not_packed_as_this_calls(tmp_path):
    out, tar = tmp_path / "call", tmp_path / "call.tgz"
    (out / "suite").mkdir(parents=True)
    (out / "suite" / "gpu-tests-kernels.md").write_text("an earlier call's summary")
    (out / "steps.json").write_text("[]\n")
    command = [sys.executable, "experiments/device_call.py", "--limit", "30", "--out", str(out), "--tar", str(tar),
               "--steps", "report"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "held an earlier call's files" in result.stdout
    with tarfile.open(tar) as packed:
        assert sorted(packed.getnames()) == ["call", "call/steps.json"]
    # A folder that no call wrote is left alone.
    (out / "steps.json").unlink()
    (out / "notes.txt").write_text("keep me")
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "no earlier call wrote" in refused.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_an_ab_without_a_kernel_to_decide_on_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "experiments/device_call.py", "--limit", "30", "--out", str(tmp_path),
                             "--ab", "experiments/patches/resident-slices-per-warp.patch"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--ab needs --decide" in result.stderr


def test_patches_named_relative_to_the_tree_reach_the_steps_as_absolute_paths(monkeypatch):
    # The steps apply them inside scratch trees, where a relative name no longer points at the file.
    call = load_experiment("device_call")
    monkeypatch.chdir(ROOT)
    patch = "experiments/patches/resident-next-row-group-early.patch"
    args = call.parse_args(["--limit", "30", "--out", "out", "--ab", patch, "--decide", "plan",
                            "--phase-variants", patch])
    assert args.ab == [ROOT / patch] and args.phase_variants == [ROOT / patch]
    assert all(p.is_absolute() and p.exists() for p in args.ab + args.phase_variants)


def test_the_phase_probe_applies_to_this_tree_and_its_step_is_sized_like_the_others(tmp_path):
    call = load_experiment("device_call")
    assert "phase" in call.STEPS and "phase" in call.ESTIMATES
    kernel_ab = load_experiment("kernel_ab")
    tree = kernel_ab.patched_copy(call.PHASE_PROBE, tmp_path / "tree")
    assert "fs::phase_clock(a.splitk_partials, 0);" in (tree / "templates" / "segment.cu.j2").read_text()
    assert (tree / "experiments" / "phase_clock.py").exists()


def test_the_phase_probe_goes_on_top_of_a_variant_and_one_that_does_not_apply_is_named(tmp_path):
    call = load_experiment("device_call")
    variant = ROOT / "experiments" / "patches" / "resident-next-row-group-early.patch"
    tree = call.probed_copy(tmp_path / "tree", variant)
    resident = (tree / "kernels" / "fs_gemm_resident.cuh").read_text()
    assert "load_rows(m0 + kResidentRowGroup, next_lo, next_hi)" in resident and "phase_clock(" in resident
    # A variant that rewrites lines the probe anchors on (two lines of context before its start stamps); the probe
    # still goes on, with fuzz. Made against the tree as it is, so the test does not go stale with the kernels.
    if shutil.which("patch") is None:
        pytest.skip("needs patch(1)")
    original = (ROOT / "kernels" / "fs_gemm_resident.cuh").read_text()
    anchors = "int index = 0;\n      ((sources[index++]"
    assert original.count(anchors) == 1
    renamed = original.replace(anchors, "int next = 0;\n      ((sources[next++]")
    moving = tmp_path / "moving.patch"
    moving.write_text("".join(difflib.unified_diff(original.splitlines(keepends=True), renamed.splitlines(keepends=True),
                                                   "a/kernels/fs_gemm_resident.cuh", "b/kernels/fs_gemm_resident.cuh")))
    moved = call.probed_copy(tmp_path / "moved", moving)
    resident = (moved / "kernels" / "fs_gemm_resident.cuh").read_text()
    assert "sources[next++]" in resident and "phase_clock(a.splitk_partials, 21);" in resident
    assert "fs::phase_clock(a.splitk_partials, 0);" in (moved / "templates" / "segment.cu.j2").read_text()
    clash = ROOT / "experiments" / "patches" / "resident-layernorm-9-as-its-own-stage.patch"  # already on main
    with pytest.raises(SystemExit, match="does not apply"):
        call.probed_copy(tmp_path / "other", clash)


def test_a_step_past_its_time_is_asked_to_stop_and_may_still_write_its_summary(tmp_path):
    call = load_experiment("device_call")
    summary = tmp_path / "summary.txt"
    polite = ("import signal, sys, time\n"
              "def stop(*_):\n"
              f"    open({str(summary)!r}, 'w').write('what ran')\n"
              "    sys.exit(3)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    assert call.run_until([sys.executable, "-c", polite], tmp_path / "polite.log", 2, grace=20) == 124
    assert summary.read_text() == "what ran" and "started" in (tmp_path / "polite.log").read_text()
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    assert call.run_until([sys.executable, "-c", stubborn], tmp_path / "stubborn.log", 1, grace=1) == 124
    assert call.run_until([sys.executable, "-c", "raise SystemExit(5)"], tmp_path / "quick.log", 30) == 5


def test_wheels_are_installed_once_per_set_so_a_warm_machine_keeps_its_header_times(tmp_path, monkeypatch):
    call = load_experiment("device_call")
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    site.mkdir()
    (wheels / "nvidia_cutlass-4.2.0.0-py3-none-any.whl").write_bytes(b"x" * 10)
    pip_runs = []
    monkeypatch.setattr(call.subprocess, "run", lambda command, **kwargs: pip_runs.append(command))
    monkeypatch.setenv("PYTHONPATH", "")
    assert call.install_wheels(wheels, site) and len(pip_runs) == 1
    assert str(site) in call.os.environ["PYTHONPATH"].split(call.os.pathsep)
    assert not call.install_wheels(wheels, site) and len(pip_runs) == 1  # the same wheels: nothing to do
    (wheels / "tqdm-4.70.1-py3-none-any.whl").write_bytes(b"y")
    assert call.install_wheels(wheels, site) and len(pip_runs) == 2
    assert "--target" in pip_runs[-1] and str(site) in pip_runs[-1]
