"""Build cache: content keys, unique module names, flock with a timeout that names the lock, atomic writes."""
import multiprocessing
import time

import pytest

from fusionsearch import build
from fusionsearch.build import BuildError, file_lock, library_spec, write_atomic, write_sources
from fusionsearch.config import LayerConfig
from fusionsearch.plan import Segment, all_segments

FEW = (Segment(0, 1), Segment(2, 5, True), Segment(7, 10))


def test_spec_covers_every_segment_by_default():
    spec = library_spec(LayerConfig(), arch="90")
    assert len(spec.segment_names) == len(all_segments()) == 150
    assert len(spec.units) == 144  # the six lone GEMMs run through cuBLAS
    assert spec.segment_names[0] == "seg_00_00"


def test_key_depends_on_signature_dtype_arch_and_segments_but_not_on_shape():
    base = library_spec(LayerConfig(), FEW, arch="90")
    assert library_spec(LayerConfig(batch=7, seq_len=33), FEW, arch="90").key == base.key
    for other in (library_spec(LayerConfig(dtype="bf16"), FEW, arch="90"),
                  library_spec(LayerConfig(heads=16), FEW, arch="90"),
                  library_spec(LayerConfig(), FEW, arch="89"),
                  library_spec(LayerConfig(), FEW[:2], arch="90")):
        assert other.key != base.key and other.module_name != base.module_name


def test_key_depends_on_compiler_flags_and_toolchain(monkeypatch):
    base = library_spec(LayerConfig(), FEW, arch="90")
    monkeypatch.setattr(build, "NVCC_FLAGS", build.NVCC_FLAGS + ("-G",))
    assert library_spec(LayerConfig(), FEW, arch="90").key != base.key
    monkeypatch.undo()
    monkeypatch.setattr(build, "toolchain_versions", lambda: {"torch": "9.9", "cuda": "99.0"})
    assert library_spec(LayerConfig(), FEW, arch="90").key != base.key


def test_cache_dir_comes_from_the_environment(fresh_cache):
    spec = library_spec(LayerConfig(), FEW, arch="90")
    paths = write_sources(spec)
    assert all(str(p).startswith(str(fresh_cache)) for p in paths)
    assert (build.build_dir(spec) / "library.json").exists()
    assert len(paths) == len(FEW) + 1


def test_atomic_write_skips_unchanged_files(tmp_path):
    path = tmp_path / "unit.cu"
    assert write_atomic(path, "a")
    mtime = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert not write_atomic(path, "a")
    assert path.stat().st_mtime_ns == mtime
    assert write_atomic(path, "b") and path.read_text() == "b"
    assert not list(tmp_path.glob(".*.tmp"))


def _hold_lock(path, ready, release):
    with file_lock(path, timeout_s=5):
        ready.set()
        release.wait(10)


@pytest.fixture()
def held_lock(tmp_path):
    """A lock file held by another process until the test releases or kills it."""
    path = tmp_path / "lib.lock"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    assert ready.wait(20)
    yield path, holder
    if holder.is_alive():  # a killed holder may die inside the Event's lock, so leave the Event alone then
        release.set()
    holder.join(10)


def test_lock_times_out_with_a_message_naming_the_lock(held_lock):
    path, _ = held_lock
    with pytest.raises(BuildError, match=str(path)):
        with file_lock(path, timeout_s=0.5):
            pass


def test_lock_dies_with_its_holder(held_lock):
    path, holder = held_lock
    holder.kill()
    holder.join(10)
    with file_lock(path, timeout_s=2):
        pass


def test_arch_needs_a_gpu_or_an_override(monkeypatch):
    monkeypatch.setenv("FUSIONSEARCH_CUDA_ARCH", "sm_90a")
    assert build.current_arch() == "90a"


def test_arch_list_for_cpp_extension_keeps_the_feature_suffix_and_hopper_builds_sm90a():
    import os
    for arch, expected in (("90", "9.0a"), ("90a", "9.0a"), ("80", "8.0"), ("100", "10.0"), ("100a", "10.0a")):
        with build._arch_environment(arch):
            assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


def test_cutlass_headers_join_the_build_only_for_hopper_gemm_and_attention_segments():
    from fusionsearch.resources import cutlass_include_dirs, kernels_dir
    for segments in ((Segment(0, 9), Segment(10, 11), Segment(12, 14)), (Segment(0, 1), Segment(2, 5, True))):
        hopper = library_spec(LayerConfig(), segments, arch="90")
        assert build.needs_cutlass(hopper)
        assert build.include_dirs(hopper) == [str(kernels_dir()), *cutlass_include_dirs()]
    for arch, segments in (("80", (Segment(0, 9), Segment(10, 11), Segment(12, 14))), ("80", FEW),
                           ("90", (Segment(0, 1), Segment(2, 7, True), Segment(8, 10)))):
        spec = library_spec(LayerConfig(), segments, arch=arch)
        assert not build.needs_cutlass(spec)
        assert build.include_dirs(spec) == [str(kernels_dir())]


def test_missing_cutlass_headers_fail_the_build_with_the_package_to_install(monkeypatch):
    from fusionsearch import resources
    monkeypatch.setattr(build, "cutlass_include_dirs", lambda: resources.cutlass_include_dirs.__wrapped__())
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    spec = library_spec(LayerConfig(), (Segment(10, 11),), arch="90")
    with pytest.raises(BuildError, match=r"pip install 'nvidia-cutlass==4\.2\.0\.0'"):
        build.include_dirs(spec)


def test_a_loaded_full_library_serves_any_plan_of_its_signature(monkeypatch):
    from fusionsearch import runtime
    monkeypatch.setenv("FUSIONSEARCH_CUDA_ARCH", "90")
    monkeypatch.setattr(runtime, "_FULL_LIBRARIES", {})
    loaded = []
    monkeypatch.setattr(runtime, "load_library", lambda spec: loaded.append(spec) or object())
    own = runtime.KernelLibrary.get(LayerConfig(), FEW)  # no full library yet: the plan's own
    assert own.spec.segment_names == tuple(s.name for s in FEW) and len(loaded) == 1
    full = runtime.KernelLibrary.get(LayerConfig())
    assert len(full.spec.segment_names) == 150 and len(loaded) == 2
    assert runtime.KernelLibrary.get(LayerConfig(batch=3, seq_len=70), FEW) is full  # shape is not in the key
    assert full.index(FEW[1]) == full.spec.segment_names.index("seg_02_05_fa")
    other = runtime.KernelLibrary.get(LayerConfig(dtype="bf16"), FEW)  # another signature builds its own
    assert other is not full and len(loaded) == 3
