"""Run the GPU proof on a CUDA machine: cold and warm builds timed, then `pytest -m gpu`; write a summary.

    PYTHONPATH=. python experiments/gpu_suite.py --out DIR [--pytest-args "-k segment"] [--skip-builds]
        [--cache DIR] [--suffix=-kernels]

The summary (DIR/gpu-tests-DATE{suffix}.md and DIR/gpu-suite{suffix}.json) names the device, the kernel sources
hash, the command as it was given, the library builds (timed here, or by the tests themselves) and every test.
Each test is also logged to DIR/gpu-progress{suffix}.jsonl as it finishes (tests/conftest.py), so that a run
killed outright leaves which tests ran, and the summary is built from that log when pytest left no report.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BUILD = ("import sys, time; from fusionsearch.config import LayerConfig; from fusionsearch.runtime import KernelLibrary;"
         "t = time.perf_counter(); lib = KernelLibrary.get(LayerConfig(dtype=sys.argv[1]));"
         "print(f'{time.perf_counter() - t:.2f} {len(lib.spec.units)}')")


def timed_build(dtype: str, cache: str) -> tuple[float, int]:
    """Build or load every segment of BERT-base for dtype in a fresh process; seconds and kernel count."""
    env = dict(os.environ, FUSIONSEARCH_CACHE_DIR=cache)
    result = subprocess.run([sys.executable, "-c", BUILD, dtype], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"building the {dtype} library failed")
    seconds, count = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(count)


def device_facts() -> dict:
    import torch

    from fusionsearch.resources import sources_hash
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
            "cpus": os.cpu_count(), "kernel_sources_hash": sources_hash()}


# Imported by the test modules at collection time, or (cutlass_library: its headers) needed by the Hopper GEMM
# builds: one missing would stop the run after minutes of builds.
REQUIRED_MODULES = ("jinja2", "numpy", "pandas", "scipy", "xgboost", "cutlass_library")


def missing_modules() -> list[str]:
    import importlib.util
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def run_to_the_end(command: list[str], env: dict) -> tuple[int, str | None]:
    """Run `command` (pytest) in a session of its own. A SIGTERM or SIGINT to this process (a timeout, Ctrl-C)
    reaches it once, as SIGINT: pytest then stops after the current test and still writes its report, so the
    summary below keeps what ran. (exit code, name of the signal that stopped the run or None)."""
    stopped: list[str] = []
    started: list[subprocess.Popen] = []
    sent: list[bool] = []

    def interrupt_once() -> None:
        if stopped and started and not sent:
            sent.append(True)
            started[0].send_signal(signal.SIGINT)

    def forward(signum, _frame):
        if not stopped:
            stopped.append(signal.Signals(signum).name)
        interrupt_once()

    # The handlers go in before the start: a started program gets a handled signal back as the default, while an
    # ignored one stays ignored, and a background job of a shell starts with SIGINT ignored. Python installs its
    # KeyboardInterrupt only over the default, so pytest would not stop.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        started.append(subprocess.Popen(command, env=env, start_new_session=True))
        interrupt_once()  # a signal that came while it started
        code = started[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, (stopped[0] if stopped else None)


def junit_cases(path: Path) -> list[dict]:
    """Name, seconds and status of every test case in a JUnit report; none where pytest wrote no report."""
    if not path.is_file():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test a stop interrupted: pytest leaves an empty entry for it
            continue
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                status = tag
        cases.append({"name": case.get("name"), "time_s": float(case.get("time", 0)), "status": status})
    return cases


def progress_cases(path: Path) -> list[dict]:
    """The tests tests/conftest.py logged as they finished, for a run that left no JUnit report (killed outright);
    a torn last line is dropped."""
    cases = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            cases.append(json.loads(line))
        except ValueError:
            continue
    return cases


def libraries_built_in_tests(session: Path) -> dict[str, float]:
    """Seconds per library that the tests built themselves (tests/gpu_support.py writes them); none if none."""
    try:
        return json.loads(session.read_text()).get("build_s", {})
    except (OSError, ValueError):
        return {}


def _message_cell(case: dict) -> str:
    """A failure's logged message after its status, safe inside a Markdown table cell."""
    message = case.get("message")
    return f": {message.replace('|', '/')}" if message else ""


def summary_markdown(summary: dict) -> str:
    """The run's summary as Markdown: device, the exact command, builds, the pytest outcome and every test."""
    facts, builds, cases = summary["device"], summary["builds"], summary["tests"]
    code, stopped_by = summary["pytest_exit"], summary["stopped_by"]
    lines = [f"# GPU test suite, {summary['date']}", "",
             f"Device: {facts['gpu']} (sm {facts['capability']}, {facts['sm_count']} SMs), torch {facts['torch']}, "
             f"CUDA {facts['cuda']}, {facts['nvcc']}, {facts['cpus']} CPU cores; kernel sources hash "
             f"{facts['kernel_sources_hash']}.", "",
             f"Command: `PYTHONPATH=. {summary['command']}`", ""]
    if builds:
        lines += ["| library (BERT-base dims) | kernels | cold build s | warm load s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['kernels']} | {v['cold_s']:.1f} | {v['warm_load_s']:.2f} |" for k, v in builds.items()]
        lines.append("")
    if summary["library_builds_in_tests_s"]:
        lines += ["Libraries the tests built (or loaded from the cache): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in summary["library_builds_in_tests_s"].items()) + ".", ""]
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
    lines += [f"pytest -m gpu: {counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
              f"{counts['skipped']} skipped in {summary['pytest_wall_s']:.0f} s (exit {code})"
              + (f"; stopped by {stopped_by} before the end: the tests not listed did not run." if stopped_by else ".")]
    if summary.get("tests_from") == "progress log":
        lines.append("pytest wrote no report; the tests below are those it logged as they finished "
                     f"({'none' if not cases else len(cases)}).")
    elif not cases:
        lines.append("pytest wrote no report.")
    lines += ["", "| test | status | s |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']}{_message_cell(c)} | {c['time_s']:.1f} |" for c in cases]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pytest-args", default="")
    parser.add_argument("--skip-builds", action="store_true", help="do not time cold/warm builds")
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--cache", default=None, help="build cache to use (default: a fresh temporary folder)")
    args = parser.parse_args()
    missing = missing_modules()
    if missing:
        parser.exit(2, f"gpu_suite: {', '.join(missing)} not importable; the tests import them. Install them first "
                       "(offline: pip install --no-deps --target DIR WHEELS, then put DIR on PYTHONPATH).\n")
    args.out.mkdir(parents=True, exist_ok=True)
    facts = device_facts()
    cache = args.cache or tempfile.mkdtemp(prefix="fs-cache-")
    builds = {}
    if not args.skip_builds:
        for dtype in ("fp16", "bf16"):
            cold, count = timed_build(dtype, cache)
            warm, _ = timed_build(dtype, cache)
            builds[dtype] = {"kernels": count, "cold_s": cold, "warm_load_s": warm}
            print(f"{dtype}: {count} kernels, cold build {cold:.1f} s, warm load {warm:.2f} s", flush=True)
    junit, progress = args.out / "gpu-junit.xml", args.out / f"gpu-progress{args.suffix}.jsonl"
    env = dict(os.environ, FUSIONSEARCH_GPU_TEST_CACHE=cache, FUSIONSEARCH_GPU_SUMMARY=str(args.out / "session.json"),
               FUSIONSEARCH_GPU_PROGRESS=str(progress))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "--durations=0", f"--junitxml={junit}",
               *shlex.split(args.pytest_args)]
    # What an earlier run left must not pass for this one's.
    for stale in (junit, progress, args.out / "session.json"):
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    code, stopped_by = run_to_the_end(command, env)
    wall = time.perf_counter() - start
    if junit.is_file():
        tests_from, cases = "JUnit report", junit_cases(junit)
    else:
        tests_from, cases = "progress log", progress_cases(progress)
    summary = {"date": dt.date.today().isoformat(), "device": facts, "command": shlex.join(["python", *sys.argv]),
               "builds": builds, "library_builds_in_tests_s": libraries_built_in_tests(args.out / "session.json"),
               "pytest_exit": code, "pytest_wall_s": wall, "stopped_by": stopped_by, "tests_from": tests_from,
               "tests": cases}
    (args.out / f"gpu-suite{args.suffix}.json").write_text(json.dumps(summary, indent=1))
    text = summary_markdown(summary)
    (args.out / f"gpu-tests-{summary['date']}{args.suffix}.md").write_text(text)
    print(text, end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
