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


# The Python that decides what a kernel's source says, beside the templates and headers: a schedule change alters
# the generated kernels, so it must alter the hash that builds and records are matched on.
_GENERATING_MODULES = ("codegen.py", "layout.py", "schedule.py")


@cache
def sources_hash() -> str:
    """Content hash of every template, hand-written kernel header and generating module: part of every build key
    and record."""
    digest = hashlib.sha256()
    for folder in (templates_dir(), kernels_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix in (".j2", ".cuh", ".h"):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    for name in _GENERATING_MODULES:
        digest.update(name.encode())
        digest.update((_PACKAGE_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"


@cache
def cutlass_include_dirs() -> tuple[str, ...]:
    """Header folders (cute/, cutlass/, cutlass/util/) of the pinned nvidia-cutlass wheel, found without importing
    its Python side; the Hopper GEMM segments (kernels/fs_gemm_sm90.cuh) compile against them."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"fusionsearch needs the CUTLASS headers of {CUTLASS_REQUIREMENT}, which is not "
                                f"installed; pip install '{CUTLASS_REQUIREMENT}' (a dependency of fusionsearch)")
    source = Path(next(iter(spec.submodule_search_locations))) / "source"
    dirs = (source / "include", source / "tools" / "util" / "include")
    if not (dirs[0] / "cute" / "tensor.hpp").is_file():
        raise FileNotFoundError(f"the nvidia-cutlass package at {source.parent} has no headers under {dirs[0]}; "
                                f"reinstall it: pip install --force-reinstall '{CUTLASS_REQUIREMENT}'")
    return tuple(str(d) for d in dirs)
