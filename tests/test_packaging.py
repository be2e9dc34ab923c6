"""A non-editable install ships templates/ and kernels/ inside the package (DESIGN §4)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent
# Source folder → package folder inside the wheel, as pyproject.toml's package-dir maps them.
SHIPPED = {"templates": ("fusionsearch/templates", (".j2",)), "kernels": ("fusionsearch/kernels", (".cuh", ".h"))}
# Probe files the test adds to its copy of the tree, so the package_data globs are checked before real ones exist.
PROBES = {"templates": "probe_packaging_test.cu.j2", "kernels": "probe_packaging_test.cuh"}
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py", "fusionsearch",
                *SHIPPED)


def _setuptools_version() -> tuple[int, ...]:
    if importlib.util.find_spec("setuptools") is None:
        return (0,)
    import setuptools

    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


def real_files(folder: str) -> list[Path]:
    """Template or kernel files in the source tree (recursively, so a file in a subfolder is not forgotten)."""
    _, suffixes = SHIPPED[folder]
    root = SOURCE / folder
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build a wheel from a copy of the source tree (plus probe files) without network access."""
    if not (SOURCE / "pyproject.toml").is_file():
        pytest.skip("not running from a source tree (no pyproject.toml next to tests/)")
    if _setuptools_version() < (69,):
        pytest.skip("building offline needs setuptools>=69 in this environment; pip install 'setuptools>=69'")
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = SOURCE / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    for folder, probe in PROBES.items():
        (src / folder / probe).write_text("// probe\n")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(out.glob("fusionsearch-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_ships_template_and_kernel_files_by_their_globs(wheel_names):
    for folder, probe in PROBES.items():
        package, _ = SHIPPED[folder]
        assert f"{package}/{probe}" in wheel_names, f"{folder}/*{Path(probe).suffix} is not shipped"
    assert "fusionsearch/kernels/.keep" not in wheel_names


@pytest.mark.parametrize("folder", sorted(SHIPPED))
def test_wheel_ships_every_real_template_and_kernel_file(folder, wheel_names):
    files = real_files(folder)
    if not files:
        pytest.skip(f"{folder}/ holds no {' / '.join(SHIPPED[folder][1])} files yet")
    package, _ = SHIPPED[folder]
    missing = [str(f) for f in files if f"{package}/{f.as_posix()}" not in wheel_names]
    assert not missing, f"files of {folder}/ missing from the wheel (subfolders need their own glob): {missing}"


def test_wheel_ships_the_code_and_the_console_script(wheel, wheel_names):
    assert {"fusionsearch/__init__.py", "fusionsearch/cli/__init__.py", "fusionsearch/mask.py"} <= wheel_names
    entry_points = next(n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "fusionsearch = fusionsearch.cli:main" in archive.read(entry_points).decode()


def test_installed_layout_finds_templates_and_kernels_inside_the_package(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = ("import fusionsearch.resources as r; "
             "print(r.templates_dir()); print(r.kernels_dir()); print(r.sources_hash())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(site)), timeout=120)
    assert result.returncode == 0, result.stderr
    templates, kernels, digest = result.stdout.split()
    assert Path(templates) == site / "fusionsearch" / "templates"
    assert Path(kernels) == site / "fusionsearch" / "kernels"
    assert len(digest) == 16


def test_sources_hash_follows_the_modules_that_shape_generated_kernels(tmp_path, monkeypatch):
    from fusionsearch import resources
    package = tmp_path / "fusionsearch"
    package.mkdir()
    for name in resources._GENERATING_MODULES:
        shutil.copy(SOURCE / "fusionsearch" / name, package / name)
    resources.templates_dir(), resources.kernels_dir()  # found (and cached) in the source tree first
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    resources.sources_hash.cache_clear()
    try:
        before = resources.sources_hash()
        with open(package / "schedule.py", "a") as module:
            module.write("# a schedule change\n")
        resources.sources_hash.cache_clear()
        assert resources.sources_hash() != before
    finally:
        resources.sources_hash.cache_clear()


def test_cutlass_pin_in_pyproject_matches_the_one_errors_name():
    import tomllib

    from fusionsearch.resources import CUTLASS_REQUIREMENT
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert CUTLASS_REQUIREMENT in project["dependencies"]
