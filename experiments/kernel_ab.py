"""A/B of kernel patches in one GPU call: this tree against patched copies, built in parallel, timed in turns.

    PYTHONPATH=. python experiments/kernel_ab.py --patch experiments/patches/A.patch [B.patch ...] --out DIR \
        [--rounds 2] [--dtypes fp16] [--cases 64x512:48932 ...] [--check-attention]

Each variant is a copy of this checkout's code (fusionsearch/, kernels/, templates/, experiments/*.py, tests/) with one
patch applied (`git apply`, or `patch -p1` where git is missing) and is named after the patch file. Every tree
builds its plans' libraries into a cache of its own, all at once, then `plan_ab.py` runs base, each variant, base,
each variant, ... so that a drift of the machine shows up as a difference between rounds rather than between
trees. Every plan is checked against fp32 in every round; --check-attention also runs check_attention.py on each
variant while the trees build. Writes DIR/ab-<tree>-r<round>.json, DIR/ab.log and the table DIR/ab.md.

--decide KERNEL (e.g. _fa for the attention segment, or plan for the whole plans) also writes DIR/verdict.json,
keep or lose per variant, so that one device call can go on to build and test the kept tree, which --work keeps at
WORK/<patch name>.
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


def apply_patch(patch: Path, tree: Path) -> subprocess.CompletedProcess:
    """The patch applied to the files under tree: `git apply`, or `patch -p1` where git is missing."""
    command = ["git", "apply", str(patch)] if shutil.which("git") else ["patch", "-p1", "-s", "-i", str(patch)]
    return subprocess.run(command, cwd=tree, capture_output=True, text=True)


def patched_copy(patch: Path, dest: Path) -> Path:
    """This checkout's code copied to dest with the patch applied."""
    def skip(folder: str, names: list[str]) -> list[str]:
        here = Path(folder)
        if here == ROOT:
            return [n for n in names if n not in CODE]
        return [n for n in names if n in NOT_CODE]

    shutil.copytree(ROOT, dest, ignore=skip)
    result = apply_patch(patch, dest)
    if result.returncode:
        raise SystemExit(f"kernel_ab: {patch} does not apply to this tree: {result.stderr.strip()}; rebase the patch")
    return dest


def tree_env(tree: Path, cache: Path) -> dict:
    """The environment of one tree: its code first on the path (this checkout's taken off), its own build cache."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *inherited]), FUSIONSEARCH_CACHE_DIR=str(cache),
                PYTHONUNBUFFERED="1")


def samples(runs: dict[str, list[list[dict]]], tree: str, case: int, name: str) -> list[dict]:
    """One tree's samples by round (median and percentiles, µs) of kernel `name` ("plan" for the whole plan) in
    case number `case`."""
    rows = [rounds[case] for rounds in runs[tree]]
    return [r["plan"] if name == "plan" else r["segments"][name] for r in rows]


def medians(runs: dict[str, list[list[dict]]], tree: str, case: int, name: str) -> list[float]:
    """One tree's medians by round of kernel `name` in case number `case`."""
    return [sample["median"] for sample in samples(runs, tree, case, name)]


DISTURBED_SPREAD = 1.10  # a sample whose p80 exceeds its p20 by more than this is not read as a result


def disturbed_rounds(runs: dict[str, list[list[dict]]], tree: str, case: int, name: str) -> list[int]:
    """Rounds in which the base's or the variant's sample of kernel `name` spreads more than DISTURBED_SPREAD
    (p80 over p20), as a 1x32 plan once read 58.8–93.4 µs between two rounds of 23.9 while the same kernel timed
    alone right after it read 24.1: such a sample says more about the machine at that moment than the tree."""
    def spread(sample: dict) -> float:  # 1 for a sample without percentiles
        p20, p80 = sample.get("p20", 1.0), sample.get("p80", 1.0)
        return p80 / p20 if p20 > 0 else float("inf")

    pairs = zip(samples(runs, "base", case, name), samples(runs, tree, case, name))
    return [r for r, (base, other) in enumerate(pairs) if max(spread(base), spread(other)) > DISTURBED_SPREAD]


def change(runs: dict[str, list[list[dict]]], tree: str, case: int, name: str) -> float:
    """A variant's change of the mean over the rounds against the base's, in percent; disturbed rounds (both
    trees' samples of that round) are left out unless every round is."""
    base, other = medians(runs, "base", case, name), medians(runs, tree, case, name)
    left_out = set(disturbed_rounds(runs, tree, case, name))
    if len(left_out) < len(base):
        base = [v for r, v in enumerate(base) if r not in left_out]
        other = [v for r, v in enumerate(other) if r not in left_out]
    return 100 * (sum(other) / len(other) / (sum(base) / len(base)) - 1)


def table(runs: dict[str, list[list[dict]]]) -> list[str]:
    """Markdown rows: per case and kernel, each tree's medians by round, and each variant's change of the mean
    against the base, without disturbed rounds. `runs` maps tree names (base first) to rounds of plan_ab.py
    rows."""
    variants = [tree for tree in runs if tree != "base"]
    lines = ["| dtype | B×S (plan) | kernel | base µs by round | "
             + " | ".join(f"{tree} µs by round | change" for tree in variants) + " |",
             "|---|---|---|---|" + "---|---|" * len(variants)]
    for i, first in enumerate(runs["base"][0]):
        for name in ["plan", *first["segments"]]:
            cells = [" / ".join(f"{v:.1f}" for v in medians(runs, "base", i, name))]
            for tree in variants:
                left_out = disturbed_rounds(runs, tree, i, name)
                note = ("" if not left_out else " (every round disturbed)" if len(left_out) == len(runs["base"])
                        else f" (round {', '.join(str(r + 1) for r in left_out)} disturbed, left out)")
                cells += [" / ".join(f"{v:.1f}" for v in medians(runs, tree, i, name)),
                          f"{change(runs, tree, i, name):+.1f} %{note}"]
            lines.append(f"| {first['dtype']} | {first['shape']} ({first['mask']}) | {name} | " + " | ".join(cells) + " |")
    return lines


def verdicts(runs: dict[str, list[list[dict]]], kernel: str, gain: float = 1.0, slack: float = 1.0) -> dict:
    """Per variant, whether to keep it: the kernels whose name ends in `kernel` (e.g. "_fa", "seg_10_11") are
    faster by more than `gain` percent on average over the cases holding one, and no plan is slower by more than
    `slack` percent. `kernel` "plan" judges the whole plans instead, for a patch that touches kernels of several
    segments (a LayerNorm pass in [8–9], [9] and [13–14]). A script can then go on in the same device call (build
    and test the kept tree)."""
    if kernel == "plan":
        cases = [(i, "plan") for i in range(len(runs["base"][0]))]
    else:
        cases = [(i, name) for i, row in enumerate(runs["base"][0]) for name in row["segments"] if name.endswith(kernel)]
    if not cases:
        raise SystemExit(f"kernel_ab: no kernel of the cases ends in {kernel!r}; give the end of a segment name "
                         "such as _fa or seg_10_11")
    result = {}
    for tree in (t for t in runs if t != "base"):
        kernel_change = sum(change(runs, tree, i, name) for i, name in cases) / len(cases)
        worst_plan = max(change(runs, tree, i, "plan") for i in range(len(runs["base"][0])))
        result[tree] = {"kernel": kernel, "kernel_change_pct": round(kernel_change, 2),
                        "worst_plan_change_pct": round(worst_plan, 2),
                        "keep": kernel_change < -gain and worst_plan < slack}
    return result


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
    parser.add_argument("--decide", metavar="KERNEL", default=None,
                        help="also write DIR/verdict.json: keep a variant whose kernels ending in KERNEL (or whose "
                             "plans, with KERNEL 'plan') are faster by more than 1 %% on average and whose plans are "
                             "none more than 1 %% slower")
    args = parser.parse_args()
    for patch in args.patch:
        if not patch.is_file():
            parser.exit(2, f"kernel_ab: no patch at {patch}; give a file made by git format-patch or git diff\n")
    names = [patch.stem for patch in args.patch]
    if "base" in names or len(set(names)) < len(names):
        parser.exit(2, f"kernel_ab: variants are named after their patch files ({', '.join(names)}); give each "
                       "patch a distinct name other than 'base'\n")
    if args.decide and args.decide != "plan":
        from fusionsearch.mask import decode
        from plan_ab import DEFAULT_CASES, parse_case
        try:
            cases = [parse_case(case) for case in args.cases or DEFAULT_CASES]
        except argparse.ArgumentTypeError as error:
            parser.exit(2, f"kernel_ab: {error}\n")
        kernels = {seg.name for _, mask in cases for seg in decode(mask).segments}
        if not any(name.endswith(args.decide) for name in kernels):
            parser.exit(2, f"kernel_ab: no kernel of the cases ends in {args.decide!r} (they are "
                           f"{', '.join(sorted(kernels))}); give the end of one, such as _fa\n")
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
    if args.decide:
        verdict = verdicts(runs, args.decide)
        (args.out / "verdict.json").write_text(json.dumps(verdict, indent=1) + "\n")
        for tree, v in verdict.items():
            print(f"{tree}: {'keep' if v['keep'] else 'lose'} ({args.decide} {v['kernel_change_pct']:+.1f} % on "
                  f"average, worst plan {v['worst_plan_change_pct']:+.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
