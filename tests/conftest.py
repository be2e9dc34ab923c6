"""Shared test setup: skip `gpu` tests without CUDA and `nvcc` tests without the compiler; a fresh cache per test;
each finished test logged where experiments/gpu_suite.py asks for it."""
from __future__ import annotations

import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    nvcc_items = [item for item in items if "nvcc" in item.keywords]
    if gpu_items:
        # Import torch only when a GPU test was collected: a codec-only run stays fast.
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
            for item in gpu_items:
                item.add_marker(skip)
    if nvcc_items and shutil.which("nvcc") is None:
        skip = pytest.mark.skip(reason="needs the nvcc compiler on PATH")
        for item in nvcc_items:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    from gpu_support import record_progress

    record_progress(report)


@pytest.fixture(autouse=True)
def fresh_cache(request, tmp_path, monkeypatch):
    """Point FUSIONSEARCH_CACHE_DIR at an empty folder so no test reads or pollutes a real build cache.
    GPU tests share $FUSIONSEARCH_GPU_TEST_CACHE when it is set: a kernel library takes minutes to build."""
    import os

    shared = os.environ.get("FUSIONSEARCH_GPU_TEST_CACHE")
    if shared and "gpu" in request.keywords:
        monkeypatch.setenv("FUSIONSEARCH_CACHE_DIR", shared)
        return shared
    path = tmp_path / "fusionsearch-cache"
    path.mkdir()
    monkeypatch.setenv("FUSIONSEARCH_CACHE_DIR", str(path))
    return path
