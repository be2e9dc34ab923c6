"""experiments/gpu_suite.py without a GPU: a stopped run still ends in a report, JUnit reports are read, and each
finished test is logged for a run killed before pytest writes its report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from experiment_scripts import load_experiment
from gpu_support import progress_entry, record_progress


def test_a_sigterm_to_the_suite_reaches_the_tests_as_sigint_and_the_suite_lives_to_write_its_summary(tmp_path):
    suite = load_experiment("gpu_suite")
    marker, ready = tmp_path / "report-written", tmp_path / "ready"
    # Stands in for pytest: on SIGINT (KeyboardInterrupt) it writes its report and exits as pytest does (2). It says
    # when it is inside the try, so the signal cannot land while the interpreter still starts (a loaded machine
    # may take seconds), which would test Python's start-up rather than the suite.
    child = textwrap.dedent(f"""
        import sys, time
        try:
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        except KeyboardInterrupt:
            open({str(marker)!r}, "w").write("interrupted")
            sys.exit(2)
    """)

    before = signal.getsignal(signal.SIGTERM)

    def armed() -> bool:  # the child inside its try and the suite's forwarding handler in place
        return ready.exists() and signal.getsignal(signal.SIGTERM) != before

    def terminate_once_ready():
        deadline = time.monotonic() + 50
        while not armed() and time.monotonic() < deadline:
            time.sleep(0.05)
        if armed():  # else the asserts below fail, with no signal sent
            os.kill(os.getpid(), signal.SIGTERM)

    # As in a shell's background job, which starts with SIGINT ignored: the suite must still stop its pytest.
    interrupt_before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    sender = threading.Thread(target=terminate_once_ready, daemon=True)
    sender.start()
    try:
        code, stopped_by = suite.run_to_the_end([sys.executable, "-c", child], dict(os.environ))
    finally:
        sender.join()
        signal.signal(signal.SIGINT, interrupt_before)
    assert (code, stopped_by) == (2, "SIGTERM")
    assert marker.read_text() == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == before  # the forwarding handler is gone once the run is over


def test_a_run_that_ends_on_its_own_reports_no_signal():
    suite = load_experiment("gpu_suite")
    assert suite.run_to_the_end([sys.executable, "-c", "raise SystemExit(1)"], dict(os.environ)) == (1, None)


def test_junit_cases_give_each_status_and_none_without_a_report(tmp_path):
    suite = load_experiment("gpu_suite")
    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite name="pytest">'
                      '<testcase name="test_a" time="1.5"/>'
                      '<testcase name="test_b" time="0.2"><failure message="x"/></testcase>'
                      '<testcase name="test_c" time="0"><skipped message="no GPU"/></testcase>'
                      '<testcase time="0.000" />'  # what pytest leaves for a test that a stop interrupted
                      '</testsuite></testsuites>')
    assert suite.junit_cases(report) == [{"name": "test_a", "time_s": 1.5, "status": "passed"},
                                         {"name": "test_b", "time_s": 0.2, "status": "failure"},
                                         {"name": "test_c", "time_s": 0.0, "status": "skipped"}]
    assert suite.junit_cases(tmp_path / "missing.xml") == []


def test_the_summary_names_the_command_the_builds_inside_the_tests_and_a_stop(tmp_path):
    suite = load_experiment("gpu_suite")
    session = tmp_path / "session.json"
    session.write_text('{"build_s": {"fp16 h768 n12 ff3072": 116.1}}')
    builds_in_tests = suite.libraries_built_in_tests(session)
    assert builds_in_tests == {"fp16 h768 n12 ff3072": 116.1}
    assert suite.libraries_built_in_tests(tmp_path / "none.json") == {}
    device = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132, "torch": "2.11.0", "cuda": "13.0",
              "nvcc": "Build cuda_13.0", "cpus": 16, "kernel_sources_hash": "c444290c33c24235"}
    summary = {"date": "2026-12-06", "device": device,
               "command": "python experiments/gpu_suite.py --skip-builds --cache /tmp/c --suffix=-kernels",
               "builds": {}, "library_builds_in_tests_s": builds_in_tests, "pytest_exit": 2, "pytest_wall_s": 300.4,
               "stopped_by": "SIGTERM", "tests": [{"name": "test_a", "time_s": 1.25, "status": "passed"},
                                                   {"name": "test_b", "time_s": 0.5, "status": "failure",
                                                    "message": "AssertionError: a | b"}]}
    text = suite.summary_markdown(summary)
    assert "kernel sources hash c444290c33c24235" in text
    assert "Command: `PYTHONPATH=. python experiments/gpu_suite.py --skip-builds --cache /tmp/c --suffix=-kernels`" in text
    assert "fp16 h768 n12 ff3072 116.1 s" in text
    assert "1 passed, 1 failed, 0 errors, 0 skipped in 300 s (exit 2); stopped by SIGTERM" in text
    assert "| test_b | failure: AssertionError: a / b | 0.5 |" in text


def test_each_finished_test_is_logged_as_the_junit_report_would_list_it(tmp_path, monkeypatch):
    def report(when, outcome):
        return SimpleNamespace(when=when, outcome=outcome, nodeid="tests/t.py::test_x[fp16]", duration=1.5)

    assert progress_entry(report("setup", "passed")) is None and progress_entry(report("teardown", "passed")) is None
    assert progress_entry(report("call", "failed")) == {"name": "test_x[fp16]", "time_s": 1.5, "status": "failure"}
    assert progress_entry(report("setup", "skipped"))["status"] == "skipped"
    assert progress_entry(report("setup", "failed"))["status"] == "error"
    log = tmp_path / "progress.jsonl"
    monkeypatch.delenv("FUSIONSEARCH_GPU_PROGRESS", raising=False)
    record_progress(report("call", "passed"))
    assert not log.exists()
    monkeypatch.setenv("FUSIONSEARCH_GPU_PROGRESS", str(log))
    record_progress(report("call", "passed"))
    record_progress(report("teardown", "passed"))
    assert [json.loads(line)["status"] for line in log.read_text().splitlines()] == ["passed"]


def test_a_logged_failure_keeps_the_first_line_of_its_message():
    def failed(message, when="call"):
        crash = SimpleNamespace(message=message)
        return SimpleNamespace(when=when, outcome="failed", nodeid="tests/t.py::test_y", duration=2.0,
                               longrepr=SimpleNamespace(reprcrash=crash))

    assert progress_entry(failed("assert 130 == 0\n +  where 130 = main([...])")) == {
        "name": "test_y", "time_s": 2.0, "status": "failure", "message": "assert 130 == 0"}
    assert progress_entry(failed("x" * 1000))["message"] == "x" * 300
    assert progress_entry(failed("RuntimeError: no GPU", when="setup"))["message"] == "RuntimeError: no GPU"


def test_the_conftest_logs_a_real_run_and_the_suite_reads_the_log_back(tmp_path):
    log = tmp_path / "gpu-progress.jsonl"
    test = "tests/test_mask.py::test_sixteen_character_bit_string_is_binary_not_decimal"
    env = dict(os.environ, FUSIONSEARCH_GPU_PROGRESS=str(log))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:]
    with open(log, "a") as torn:  # a run killed while it wrote its last line
        torn.write('{"name": "test_y", "ti')
    suite = load_experiment("gpu_suite")
    cases = suite.progress_cases(log)
    assert [(c["name"], c["status"]) for c in cases] == [(test.split("::")[-1], "passed")]
    assert suite.progress_cases(tmp_path / "missing.jsonl") == []


def test_a_summary_from_the_progress_log_says_so():
    suite = load_experiment("gpu_suite")
    device = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132, "torch": "2.11.0", "cuda": "13.0",
              "nvcc": "Build cuda_13.0", "cpus": 16, "kernel_sources_hash": "070e64e72738150e"}
    summary = {"date": "2026-12-06", "device": device, "command": "python experiments/gpu_suite.py", "builds": {},
               "library_builds_in_tests_s": {}, "pytest_exit": -9, "pytest_wall_s": 120.0, "stopped_by": None,
               "tests_from": "progress log", "tests": [{"name": "test_a", "time_s": 100.0, "status": "passed"}]}
    text = suite.summary_markdown(summary)
    assert "pytest wrote no report; the tests below are those it logged as they finished (1)." in text
    assert "| test_a | passed | 100.0 |" in text
