"""The one place that reads environment variables and holds defaults."""
from __future__ import annotations

import os
from pathlib import Path

# Shape of the default job: BERT-base at batch 16, sequence 128.
DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 128
DEFAULT_HEADS = 12
DEFAULT_HEAD_SIZE = 64
DEFAULT_FFN = 3072
DEFAULT_DTYPE = "fp16"
DEFAULT_EPS = 1e-12

# Limits of the generated kernels.
SUPPORTED_HEAD_SIZES = (32, 64, 128)
MAX_SEQ_LEN = 1024
MAX_BATCH = 4096


def cache_dir() -> Path:
    """Root of the build cache: $FUSIONSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/fusionsearch, else ~/.cache/fusionsearch."""
    explicit = os.environ.get("FUSIONSEARCH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "fusionsearch").resolve()


def build_jobs() -> int | None:
    """Parallel compile jobs for ninja ($FUSIONSEARCH_BUILD_JOBS); None lets ninja decide."""
    value = os.environ.get("FUSIONSEARCH_BUILD_JOBS")
    return int(value) if value else None


def lock_timeout_s() -> float:
    """Seconds to wait for the build lock before giving up ($FUSIONSEARCH_LOCK_TIMEOUT, default 1800)."""
    return float(os.environ.get("FUSIONSEARCH_LOCK_TIMEOUT", "1800"))


def cuda_arch() -> str | None:
    """Target architecture override such as '90a' ($FUSIONSEARCH_CUDA_ARCH); None means: the current GPU."""
    return os.environ.get("FUSIONSEARCH_CUDA_ARCH") or None


def verbose_build() -> bool:
    """Show compiler command lines and output ($FUSIONSEARCH_VERBOSE_BUILD=1)."""
    return os.environ.get("FUSIONSEARCH_VERBOSE_BUILD", "") not in ("", "0")
