"""Session-wide kernel libraries for the GPU tests (building one takes minutes, so it happens once)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

_LIBRARIES: dict = {}
BUILD_TIMES: dict[str, float] = {}


def library_for(cfg, segments=None):
    """Build (or load) every segment kernel of cfg's signature, or only `segments`, once per test session."""
    from fusionsearch.runtime import KernelLibrary

    key = (tuple(sorted(cfg.kernel_signature().items())), segments)
    if key not in _LIBRARIES:
        cache = os.environ.get("FUSIONSEARCH_GPU_TEST_CACHE") or tempfile.mkdtemp(prefix="fs-gpu-cache-")
        saved = os.environ.get("FUSIONSEARCH_CACHE_DIR")
        os.environ["FUSIONSEARCH_CACHE_DIR"] = cache
        try:
            start = time.perf_counter()
            _LIBRARIES[key] = KernelLibrary.get(cfg, segments)
            label = f"{cfg.dtype} h{cfg.hidden} n{cfg.heads} ff{cfg.ffn}"
            label += f", {len(segments)} segments" if segments else ""
            BUILD_TIMES[label] = time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("FUSIONSEARCH_CACHE_DIR", None)
            else:
                os.environ["FUSIONSEARCH_CACHE_DIR"] = saved
        summary = os.environ.get("FUSIONSEARCH_GPU_SUMMARY")
        if summary:
            Path(summary).write_text(json.dumps({"build_s": BUILD_TIMES}, indent=1))
    return _LIBRARIES[key]


MESSAGE_CHARS = 300  # of a failure's message in the log: its first line, enough to tell one cause from another


def progress_entry(report) -> dict | None:
    """One finished test as the JUnit report would list it (name, seconds, status), from pytest's report of one of
    its phases; None for the phases that add nothing (a passing setup or teardown). A failure keeps the first line
    of its message, so a run killed before pytest wrote its own report still says why (a CLI that a stop's SIGINT
    reached returns 130, and the test fails on that)."""
    if report.when == "call":
        status = {"passed": "passed", "failed": "failure", "skipped": "skipped"}[report.outcome]
    elif report.outcome == "skipped":
        status = "skipped"
    elif report.outcome == "failed":
        status = "error"
    else:
        return None
    entry = {"name": report.nodeid.split("::")[-1], "time_s": report.duration, "status": status}
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    message = (getattr(crash, "message", "") or "").strip() if report.outcome == "failed" else ""
    if message:
        entry["message"] = message.splitlines()[0][:MESSAGE_CHARS]
    return entry


def record_progress(report) -> None:
    """Append the test to $FUSIONSEARCH_GPU_PROGRESS as one JSON line, on disk before the next test starts: a run
    killed outright (a device call's time running out) still leaves which tests passed."""
    path = os.environ.get("FUSIONSEARCH_GPU_PROGRESS")
    entry = progress_entry(report) if path else None
    if entry is None:
        return
    with open(path, "a") as log:
        log.write(json.dumps(entry) + "\n")
        log.flush()
        os.fsync(log.fileno())
