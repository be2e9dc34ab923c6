"""Where templates/ and kernels/ are: the source tree when run from it, else the installed package."""
from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _locate(name: str) -> Path:
    # Inside the installed package first; the source tree keeps them one level up.
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    raise FileNotFoundError(f"fusionsearch cannot find its {name}/ folder next to {_PACKAGE_DIR}; "
                            "reinstall the package (pip install .) or run from the source tree")


@cache
def templates_dir() -> Path:
    return _locate("templates")


@cache
def kernels_dir() -> Path:
    return _locate("kernels")


@cache
def sources_hash() -> str:
    """Content hash of every template and hand-written kernel header: part of every build key and record."""
    digest = hashlib.sha256()
    for folder in (templates_dir(), kernels_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix in (".j2", ".cuh", ".h"):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
