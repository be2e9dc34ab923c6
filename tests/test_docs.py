"""The README points only at files that exist: results, data, scripts and sources it names are in the tree."""
from __future__ import annotations

import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
# Backticked paths under these folders are references to files of the tree (globs allowed).
TREE_PATH = re.compile(r"`((?:experiments|fusionsearch|kernels|templates|tests|docs)/[^`\s]*)`")


def referenced_paths(text: str) -> list[str]:
    return sorted(set(TREE_PATH.findall(text)))


def test_every_path_the_readme_names_exists():
    paths = referenced_paths((SOURCE / "README.md").read_text())
    assert len(paths) > 20  # the pattern still finds the README's references
    missing = [p for p in paths if not any(SOURCE.glob(p.rstrip("/")))]
    assert not missing, f"README.md names paths that are not in the tree: {missing}; fix the path or the file"


def test_the_reference_pattern_reads_paths_and_globs_but_not_commands():
    text = "see `experiments/results/perf-h200.md`, `templates/*.cu.j2` and `fusionsearch search --shape 16x128`"
    assert referenced_paths(text) == ["experiments/results/perf-h200.md", "templates/*.cu.j2"]
