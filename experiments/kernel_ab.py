"""A/B of kernel patches in one GPU call: this tree against patched copies, built in parallel, timed in turns.

    PYTHONPATH=. python experiments/kernel_ab.py --patch experiments/patches/A.patch [B.patch ...] --out DIR \
        [--rounds 2] [--dtypes fp16] [--cases 64x512:48932 ...] [--check-attention]

Each variant is a copy of this checkout's code (fusionsearch/, kernels/, templates/, experiments/*.py, tests/) with one
patch applied (`git apply`, or `patch -p1` where git is missing) and is named after the patch file. Every tree
builds its plans' libraries into a cache of its own, all at once, then `plan_ab.py` runs base, each variant, base,
each variant, ... so that a drift of the machine shows up as a difference between rounds rather than between
trees. Every plan is checked against fp32 in every round; --check-attention also runs check_attention.py on each
variant while the trees build. Writes DIR/ab-<tree>-r<round>.json, DIR/ab.log and the table DIR/ab.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("fusionsearch", "kernels", "templates", "experiments", "tests", "pyproject.toml")
NOT_CODE = ("data", "results", "patches", "__pycache__")


def patched_copy(patch: Path, dest: Path) -> Path:
    """This checkout's code copied to dest with the patch applied."""
    def skip(folder: str, names: list[str]) -> list[str]:
        here = Path(folder)
        if here == ROOT:
            return [n for n in names if n not in CODE]
        return [n for n in names if n in NOT_CODE]

    shutil.copytree(ROOT, dest, ignore=skip)
    command = ["git", "apply", str(patch)] if shutil.which("git") else ["patch", "-p1", "-s", "-i", str(patch)]
    result = subprocess.run(command, cwd=dest, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"kernel_ab: {patch} does not apply to this tree: {result.stderr.strip()}; rebase the patch")
    return dest


def tree_env(tree: Path, cache: Path) -> dict:
    """The environment of one tree: its code first on the path (this checkout's taken off), its own build cache."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *inherited]), FUSIONSEARCH_CACHE_DIR=str(cache),
                PYTHONUNBUFFERED="1")


def table(runs: dict[str, list[list[dict]]]) -> list[str]:
    """Markdown rows: per case and kernel, each tree's medians by round, and each variant's change of the mean
    against the base. `runs` maps tree names (base first) to rounds of plan_ab.py rows."""
    variants = [tree for tree in runs if tree != "base"]
    lines = ["| dtype | B×S (plan) | kernel | base µs by round | "
             + " | ".join(f"{tree} µs by round | change" for tree in variants) + " |",
             "|---|---|---|---|" + "---|---|" * len(variants)]
    for i, first in enumerate(runs["base"][0]):
        for name in ["plan", *first["segments"]]:
            def medians(tree: str) -> list[float]:
                rows = [rounds[i] for rounds in runs[tree]]
                return [(r["plan"] if name == "plan" else r["segments"][name])["median"] for r in rows]

            base = medians("base")
            cells = [" / ".join(f"{v:.1f}" for v in base)]
            for tree in variants:
                other = medians(tree)
                change = 100 * (sum(other) / len(other) / (sum(base) / len(base)) - 1)
                cells += [" / ".join(f"{v:.1f}" for v in other), f"{change:+.1f} %"]
            lines.append(f"| {first['dtype']} | {first['shape']} ({first['mask']}) | {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", required=True, nargs="+", type=Path, help="one variant per patch")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=["fp16", "bf16"])
    parser.add_argument("--cases", nargs="+", default=None, help="SHAPE:MASK pairs (default: plan_ab.py's)")
    parser.add_argument("--check-attention", action="store_true",
                        help="check each variant's attention forms too, in fp16 and bf16")
    parser.add_argument("--work", type=Path, default=None, help="folder for the copy and both caches (default: temp)")
    args = parser.parse_args()
    for patch in args.patch:
        if not patch.is_file():
            parser.exit(2, f"kernel_ab: no patch at {patch}; give a file made by git format-patch or git diff\n")
    names = [patch.stem for patch in args.patch]
    if "base" in names or len(set(names)) < len(names):
        parser.exit(2, f"kernel_ab: variants are named after their patch files ({', '.join(names)}); give each "
                       "patch a distinct name other than 'base'\n")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="fs-ab-"))
    trees = {"base": ROOT}
    trees.update({patch.stem: patched_copy(patch.resolve(), work / patch.stem) for patch in args.patch})
    caches = {tag: work / f"cache-{tag}" for tag in trees}
    common = ["--dtypes", *args.dtypes] + (["--cases", *args.cases] if args.cases else [])
    log = open(args.out / "ab.log", "w")

    def spawn(tag: str, script: str, *script_args: str) -> subprocess.Popen:
        """One of the tree's experiment scripts, in the tree with its own cache, output into the shared log."""
        command = [sys.executable, str(trees[tag] / "experiments" / script), *script_args]
        return subprocess.Popen(command, cwd=trees[tag], env=tree_env(trees[tag], caches[tag]), stdout=log,
                                stderr=subprocess.STDOUT, text=True)

    def plan_ab(tag: str, *extra: str) -> subprocess.Popen:
        return spawn(tag, "plan_ab.py", "--tag", tag, *common, *extra)

    start = time.perf_counter()
    jobs = [plan_ab(tag, "--build-only") for tag in trees]
    if args.check_attention:  # both dtypes whatever --dtypes times: a kernel change can break either
        jobs += [spawn(tag, "check_attention.py") for tag in names]
    codes = [job.wait() for job in jobs]
    print(f"builds{' and attention checks' if args.check_attention else ''}: {time.perf_counter() - start:.0f} s, "
          f"exit codes {codes}", flush=True)
    if any(codes):
        print(f"kernel_ab: a build or check failed; see {args.out / 'ab.log'}", file=sys.stderr)
        return 1
    runs: dict[str, list[list[dict]]] = {tag: [] for tag in trees}
    for r in range(1, args.rounds + 1):
        for tag in trees:
            out = args.out / f"ab-{tag}-r{r}.json"
            if plan_ab(tag, "--out", str(out)).wait():
                print(f"kernel_ab: {tag} round {r} failed its check or crashed; see {args.out / 'ab.log'}",
                      file=sys.stderr)
                return 1
            runs[tag].append(json.loads(out.read_text()))
            print(f"round {r} {tag}: done at {time.perf_counter() - start:.0f} s", flush=True)
    lines = [f"# A/B of {', '.join(p.name for p in args.patch)}", "",
             f"Rounds: {args.rounds}, base then each variant in each; every plan checked against fp32 in every round. "
             "µs: medians of CUDA-event timings over graph replays.", "", *table(runs)]
    (args.out / "ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
