"""Whether a change alters any generated kernel: one digest over every rendered unit of both full libraries.

    PYTHONPATH=. python experiments/units_digest.py [--arch 90a] [--list]

The kernel sources hash (fusionsearch.resources.sources_hash) follows the files that shape generated kernels, so a
comment or a refactor there changes it too. Run this before and after such a change: the same digest means every
unit's source is byte for byte the same, and a GPU proof of the tree before holds for the tree after. Each unit's
text is hashed as rendered; the binding is left out, as its module name carries the library key (and with it the
sources hash). No GPU, no compiler.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionsearch.build import library_spec  # noqa: E402
from fusionsearch.codegen import CTYPES  # noqa: E402
from fusionsearch.config import LayerConfig  # noqa: E402


def units_digest(arch: str, listing: bool = False) -> str:
    digest = hashlib.sha256()
    for dtype in CTYPES:  # the dtypes with generated kernels
        for unit in library_spec(LayerConfig(dtype=dtype), arch=arch).units:
            digest.update(unit.filename.encode())
            digest.update(unit.source.encode())
            if listing:
                print(f"{unit.source_hash}  {unit.filename}")
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90a", help="compute capability the units are rendered for")
    parser.add_argument("--list", action="store_true", help="also print each unit's own source hash")
    args = parser.parse_args()
    print(units_digest(args.arch, args.list))


if __name__ == "__main__":
    main()
