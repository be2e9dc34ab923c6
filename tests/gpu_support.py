"""Session-wide kernel libraries for the GPU tests (building one takes minutes, so it happens once)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

_LIBRARIES: dict = {}
BUILD_TIMES: dict[str, float] = {}


def library_for(cfg):
    """Build (or load) every segment kernel of cfg's signature once per test session."""
    from fusionsearch.runtime import KernelLibrary

    key = tuple(sorted(cfg.kernel_signature().items()))
    if key not in _LIBRARIES:
        cache = os.environ.get("FUSIONSEARCH_GPU_TEST_CACHE") or tempfile.mkdtemp(prefix="fs-gpu-cache-")
        saved = os.environ.get("FUSIONSEARCH_CACHE_DIR")
        os.environ["FUSIONSEARCH_CACHE_DIR"] = cache
        try:
            start = time.perf_counter()
            _LIBRARIES[key] = KernelLibrary.get(cfg)
            BUILD_TIMES[f"{cfg.dtype} h{cfg.hidden} n{cfg.heads} ff{cfg.ffn}"] = time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("FUSIONSEARCH_CACHE_DIR", None)
            else:
                os.environ["FUSIONSEARCH_CACHE_DIR"] = saved
        summary = os.environ.get("FUSIONSEARCH_GPU_SUMMARY")
        if summary:
            Path(summary).write_text(json.dumps({"build_s": BUILD_TIMES}, indent=1))
    return _LIBRARIES[key]
