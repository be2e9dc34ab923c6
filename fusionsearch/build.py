"""Build segment kernels into one torch extension per (config, dtype, arch), cached by content.

Each segment is its own translation unit (no torch headers); one small binding unit includes torch. ninja
compiles the units in parallel and recompiles only what changed. The build directory and module name carry
a hash of everything that determines the binary, so different code never reuses a name.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import settings
from .config import LayerConfig
from .errors import FusionSearchError
from .plan import Segment, all_segments
from .resources import cutlass_include_dirs, kernels_dir

# NDEBUG: CUTLASS keeps device-side asserts otherwise, which cost its GEMMs 10-15 % (experiments/cutlass_probe.py).
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-diag-suppress=177", "-DNDEBUG")
CXX_FLAGS = ("-O2", "-std=c++17")
CUTLASS_HEADERS = ("fs_gemm_sm90.cuh", "fs_attention_sm90.cuh")  # the kernel headers built on CUTLASS / CuTe


class BuildError(FusionSearchError):
    """Compiling or loading a kernel library failed; the message carries the compiler's last lines."""


def current_arch() -> str:
    """Compute capability of the target as digits ('90'): the override setting, else the current GPU."""
    override = settings.cuda_arch()
    if override:
        return override.replace(".", "").replace("sm_", "")
    import torch
    if not torch.cuda.is_available():
        raise BuildError("no CUDA GPU is visible, so the target architecture is unknown; run on a GPU machine "
                         "or set FUSIONSEARCH_CUDA_ARCH (e.g. 90) to only generate and compile")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def toolchain_versions() -> dict:
    import torch
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "none"}


@dataclass(frozen=True)
class GeneratedUnit:
    """One rendered translation unit: file name, kernel symbol (empty for the binding) and source text."""

    filename: str
    kernel_name: str
    source: str

    @property
    def source_hash(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()


@dataclass(frozen=True)
class LibrarySpec:
    """Everything that determines one compiled library; `key` is its content hash."""

    module_name: str
    signature: tuple
    arch: str
    units: tuple[GeneratedUnit, ...]  # one per segment
    binding: GeneratedUnit  # the torch binding
    segment_names: tuple[str, ...]
    key: str


def library_spec(cfg: LayerConfig, segments: "tuple[Segment, ...] | None" = None, arch: str | None = None) -> LibrarySpec:
    """Render every unit of a library and compute its content key (no compiler needed)."""
    from .codegen import render_binding, render_segment  # rendering needs jinja2; loading a spec does not
    from .resources import sources_hash
    arch = arch or current_arch()
    from .schedule import uses_library_gemm
    segments = tuple(segments) if segments is not None else all_segments()
    generated = {seg.name: render_segment(seg, cfg, arch) for seg in segments if not uses_library_gemm(seg)}
    units = tuple(generated.values())
    signature = tuple(sorted(cfg.kernel_signature().items()))
    sig_text = "_".join(f"{k}{v}" for k, v in signature if k != "dtype")
    digest = hashlib.sha256()
    for part in (json.dumps(signature), arch, json.dumps(toolchain_versions(), sort_keys=True), sources_hash(),
                 " ".join(NVCC_FLAGS), " ".join(CXX_FLAGS)):
        digest.update(part.encode())
    for unit in units:
        digest.update(unit.source_hash.encode())
    key = digest.hexdigest()
    name = f"fs_{cfg.dtype}_{sig_text}_sm{arch}_{key[:16]}"
    binding = render_binding(segments, {seg: unit.kernel_name for seg, unit in generated.items()}, cfg, arch, name)
    return LibrarySpec(name, signature, arch, units, binding, tuple(s.name for s in segments), key)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float | None = None):
    """An exclusive flock that dies with its holder; waits up to timeout_s, then names the lock."""
    timeout_s = settings.lock_timeout_s() if timeout_s is None else timeout_s
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildError(f"the build lock {path} is still held after {timeout_s:.0f} s; another "
                                     "build is running there — wait for it, or raise FUSIONSEARCH_LOCK_TIMEOUT") from None
                time.sleep(0.2)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> bool:
    """Write text via a temp file and os.replace; skip unchanged files so ninja keeps their objects."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return True


def build_dir(spec: LibrarySpec) -> Path:
    return settings.cache_dir() / "build" / spec.module_name


def rekeyed(spec: LibrarySpec, arch: str) -> LibrarySpec:
    """The same rendered sources keyed for another arch and this machine's toolchain (used by exports)."""
    digest = hashlib.sha256(json.dumps([spec.key, arch, toolchain_versions()], sort_keys=True).encode()).hexdigest()
    name = spec.module_name.rsplit("_sm", 1)[0] + f"_sm{arch}_{digest[:16]}"
    return replace(spec, module_name=name, arch=arch, key=digest)


def write_sources(spec: LibrarySpec) -> list[Path]:
    """Materialise the library's sources in its build directory; returns the source paths."""
    folder = build_dir(spec)
    paths = []
    for unit in (*spec.units, spec.binding):
        write_atomic(folder / unit.filename, unit.source)
        paths.append(folder / unit.filename)
    write_atomic(folder / "library.json", json.dumps(
        {"module": spec.module_name, "key": spec.key, "arch": spec.arch, "signature": dict(spec.signature),
         "segments": list(spec.segment_names), "kernels": [u.kernel_name for u in spec.units],
         "toolchain": toolchain_versions()}, indent=1))
    return paths


@contextlib.contextmanager
def _arch_environment(arch: str):
    """cpp_extension reads the target from TORCH_CUDA_ARCH_LIST and the job count from MAX_JOBS."""
    saved = {name: os.environ.get(name) for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    digits, suffix = arch.rstrip("af"), arch[len(arch.rstrip("af")):]
    if digits == "90":
        suffix = "a"  # warpgroup MMA and TMA (fs_gemm_sm90.cuh) exist only in the arch-specific sm_90a target
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{digits[:-1]}.{digits[-1]}{suffix}"
    if settings.build_jobs():
        os.environ["MAX_JOBS"] = str(settings.build_jobs())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_LOADED: dict[str, object] = {}


def needs_cutlass(spec: LibrarySpec) -> bool:
    """Whether a unit includes a Hopper kernel header, so the build needs the CUTLASS headers."""
    return any(f'#include "{header}"' in unit.source for unit in spec.units for header in CUTLASS_HEADERS)


def include_dirs(spec: LibrarySpec) -> list[str]:
    """kernels/, plus the CUTLASS headers when a unit needs them."""
    dirs = [str(kernels_dir())]
    if needs_cutlass(spec):
        try:
            dirs += cutlass_include_dirs()
        except FileNotFoundError as error:
            raise BuildError(f"{spec.module_name}: {error}") from error
    return dirs


def unit_cubin_command(source: Path, cubin: Path, arch: str = "90a") -> list[str]:
    """The nvcc command that compiles one generated unit alone to a cubin with the library build's flags: ours and
    those torch's cpp_extension adds to every CUDA unit. For checks and code inspection without a library build."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["nvcc", *NVCC_FLAGS, *COMMON_NVCC_FLAGS, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-I{kernels_dir()}", *(f"-I{d}" for d in cutlass_include_dirs()), str(source), "-o", str(cubin)]


def load_library(spec: LibrarySpec):
    """Compile (if needed) and import the library's extension module; cached per process."""
    if spec.key in _LOADED:
        return _LOADED[spec.key]
    from torch.utils.cpp_extension import load

    folder = build_dir(spec)
    with file_lock(folder.with_suffix(".lock")):
        sources = write_sources(spec)
        with _arch_environment(spec.arch):
            try:
                module = load(name=spec.module_name, sources=[str(p) for p in sources],
                              extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=list(NVCC_FLAGS),
                              extra_include_paths=include_dirs(spec), build_directory=str(folder),
                              verbose=settings.verbose_build(), with_cuda=True)
            except (RuntimeError, OSError, ImportError) as error:
                tail = "\n".join(str(error).strip().splitlines()[-30:])
                raise BuildError(f"building {spec.module_name} in {folder} failed:\n{tail}\n"
                                 "set FUSIONSEARCH_VERBOSE_BUILD=1 for the full compiler output") from error
    _LOADED[spec.key] = module
    return module
