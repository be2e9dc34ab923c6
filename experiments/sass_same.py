"""Whether this tree and another compile the same units to the same SASS (nvcc for sm_90a, the build's flags).

    PYTHONPATH=. python experiments/sass_same.py --base /path/to/other/checkout \
        --units 0-14:fa:fp16 0-14:fa:bf16 12-13:fp16 6-9:fp16

A kernel change meant for other widths only (a split rule, a compile-time check) leaves BERT-base's GPU code as it
was when every unit it touches disassembles to the same text; the GPU results of the other tree then hold for it.
Each unit is `first-last[:fa]:dtype` (fa: the segment with the attention kernel). Needs nvcc and nvdisasm (see
sass_phases.py); no GPU. Exits 1 if any unit differs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def dump(tree: Path, units: list[str], out: Path) -> None:
    """Compile `units` from `tree` (its fusionsearch, kernels and sass_phases.py) and write each one's SASS."""
    sys.path[:0] = [str(tree), str(tree / "experiments")]
    from sass_phases import compile_segment, nvdisasm

    out.mkdir(parents=True, exist_ok=True)
    for unit in units:
        spec, *flags, dtype = unit.split(":")
        with tempfile.TemporaryDirectory() as folder:
            cubin = compile_segment(spec, "fa" in flags, dtype, Path(folder))
            sass = subprocess.run([nvdisasm(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        (out / f"{unit.replace(':', '-')}.sass").write_text(sass)
        print(f"{tree.name}: {unit} compiled", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other tree (a git worktree, say)")
    parser.add_argument("--units", nargs="+", required=True, help="first-last[:fa]:dtype, e.g. 0-14:fa:fp16")
    # Internal: compile the units of the tree named by --base into DIR (one such process a tree).
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dump:
        dump(args.base.resolve(), args.units, args.dump)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        outs, jobs = {}, []
        # One process a tree, so each imports its own fusionsearch; both compile at once.
        for name, tree in (("this", HERE.parents[1]), ("base", args.base.resolve())):
            outs[name] = Path(folder) / name
            env = {**os.environ, "PYTHONPATH": str(tree)}
            jobs.append(subprocess.Popen([sys.executable, str(HERE), "--base", str(tree), "--dump", str(outs[name]),
                                          "--units", *args.units], cwd=tree, env=env))
        if any(job.wait() != 0 for job in jobs):
            raise SystemExit("sass_same: a tree's units did not compile (see above)")
        differ = []
        for unit in args.units:
            name = f"{unit.replace(':', '-')}.sass"
            this, base = ((outs[side] / name).read_text() for side in ("this", "base"))
            same = this == base
            print(f"{unit:20s} {'same' if same else 'DIFFERS'} ({len(this.splitlines())} lines of SASS)")
            differ += [] if same else [unit]
    if differ:
        print(f"sass_same: {len(differ)} of {len(args.units)} units differ: {' '.join(differ)}")
        return 1
    print(f"sass_same: all {len(args.units)} units disassemble to the same SASS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
