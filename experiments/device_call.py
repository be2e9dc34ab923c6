"""One device call that decides for itself: an optional A/B, then the proof of whatever tree won, sized to the time.

    python3 experiments/device_call.py --limit 570 --out /tmp/call --tar $OUT/call.tgz --wheels .whl \
        [--ab A.patch B.patch --cases 1x32:32768 --dtypes fp16 bf16 --rounds 3 --decide seg_00_14_fa] \
        [--steps build kernels harness report]

Steps run in order, each only if its usual duration (ESTIMATES, from a warm H100 or H200) fits the seconds left,
and each under a timeout of what is left (a SIGTERM, then GRACE seconds to write what it has, then a kill), so the
call returns before the device's limit kills it:
  ab       kernel_ab.py with --decide; the kept variant with the largest gain is applied to this checkout (on
           the device, the call's copy of the tree), so the steps after it build and prove that variant;
  build    both full libraries, in parallel, into --cache (a warm machine keeps /tmp between calls);
  kernels  the kernel GPU tests (gpu_suite.py --suffix=-kernels) on the cache;
  harness  the harness GPU tests (--suffix=-harness);
  report   perf_report.py into OUT/perf/perf-<h100|h200> (records beside it);
  phase    phase_clock.py on a copy of this tree with patches/probe-resident-phase-clock.patch applied (its own
           build cache), on --cases (default 1x32:32768) and --dtypes, into OUT/phase; then the same on a copy
           with each --phase-variants patch applied under the probe, into OUT/phase/<patch name>.
OUT/steps.json says what ran, for how long, with which exit code, on which kernel hash. --tar packs OUT into one
file, since a call brings back at most 8 files. --wheels installs the wheels the device lacks into /tmp/site first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import BUILD  # noqa: E402
from kernel_ab import apply_patch, patched_copy, tree_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("ab", "build", "kernels", "harness", "report", "phase")
PHASE_PROBE = ROOT / "experiments" / "patches" / "probe-resident-phase-clock.patch"
# Seconds a step usually takes on a warm machine (experiments/NOTES.md, "Device time per step"); a step starts
# only if this much is left. The A/B's figure is for a few cases; a larger one takes longer.
ESTIMATES = {"ab": 120, "build": 240, "kernels": 160, "harness": 470, "report": 460, "phase": 60}
PHASE_VARIANT_S = 30  # what each --phase-variants patch adds to the phase step (its probe unit's build and run)
# Seconds a step that runs out of time gets, after a SIGTERM, to end on its own: gpu_suite.py then stops pytest after
# the current test and still writes its summary, which a SIGKILL at the deadline lost even where every test had
# passed and only pytest's exit was left.
GRACE = 20
MARGIN = GRACE + 10  # seconds kept back at a step's deadline: its grace, then packing the results


def plan(steps: list[str], left: float, estimates: dict[str, float] = ESTIMATES) -> list[str]:
    """The steps that fit `left` seconds in order, skipping any that does not fit (a later, shorter one may)."""
    chosen = []
    for step in steps:
        if estimates[step] + MARGIN <= left:
            chosen.append(step)
            left -= estimates[step]
    return chosen


def run_until(command: list[str], log: Path, seconds: float, grace: float = GRACE, env: dict | None = None) -> int:
    """Run `command` from the tree's root with its output in `log`. Past `seconds` it gets a SIGTERM and `grace`
    more seconds to end on its own before it is killed; the exit code is then 124, as timeout(1) gives."""
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            return job.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            job.terminate()
            try:
                job.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()
            return 124


def kept_variant(verdict: dict) -> str | None:
    """The kept variant with the largest gain on the decided kernel, or None."""
    kept = [(v["kernel_change_pct"], name) for name, v in verdict.items() if v["keep"]]
    return min(kept)[1] if kept else None


def sources_hash() -> str:
    result = subprocess.run([sys.executable, "-c", "from fusionsearch.resources import sources_hash as h; print(h())"],
                            cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()[-200:]


def gpu_tag() -> str:
    result = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                            capture_output=True, text=True)
    return "h200" if "H200" in result.stdout else "h100"


SITE = Path("/tmp/site")


def install_wheels(folder: Path, site: Path = SITE) -> bool:
    """The device lacks some packages and has no internet: install carried wheels into `site`, unless the same
    wheels are there already (a warm machine keeps /tmp). Reinstalling would give the CUTLASS headers new times,
    and ninja would then rebuild every unit that includes them, although nothing changed. True if it installed."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"device_call: no wheels in {folder}; run ../shared/device-wheels.sh and carry .whl")
    marker = site / ".installed-wheels.json"
    wanted = json.dumps([[w.name, w.stat().st_size] for w in wheels])
    installed = not (marker.is_file() and marker.read_text() == wanted)
    if installed:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        marker.write_text(wanted)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return installed


def probed_copy(dest: Path, variant: "Path | None" = None) -> Path:
    """This tree copied to dest with the phase-clock probe applied, on top of the variant patch if one is given.
    Where a variant moved the lines the probe's hunks anchor on, the probe goes on with `patch`'s fuzz: it only adds
    stamps, and phase_clock.py says so if none appear."""
    if variant is None:
        return patched_copy(PHASE_PROBE, dest)
    tree = patched_copy(variant, dest)
    if apply_patch(PHASE_PROBE, tree).returncode == 0:
        return tree
    if shutil.which("patch") is None:
        raise SystemExit(f"the probe does not apply on top of {variant.name} as it is, and `patch` is missing")
    fuzzed = subprocess.run(["patch", "-p1", "-s", "-F3", "--no-backup-if-mismatch", "-i", str(PHASE_PROBE)],
                            cwd=tree, capture_output=True, text=True)
    if fuzzed.returncode:
        raise SystemExit(f"the probe does not apply on top of {variant.name}, even with fuzz: "
                         f"{(fuzzed.stdout + fuzzed.stderr).strip()}")
    return tree


def clear_output(out: Path) -> None:
    """Start OUT empty: a machine may come with /tmp from an earlier call, whose files would otherwise be packed
    with this call's as if it had written them. Only a folder an earlier call wrote (its steps.json) is removed."""
    if out.exists() and any(out.iterdir()):
        if not (out / "steps.json").is_file():
            raise SystemExit(f"device_call: --out {out} holds files that no earlier call wrote (no steps.json); "
                             "name a new or empty folder")
        print(f"device_call: {out} held an earlier call's files; removed", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, required=True, help="seconds this call may run (the device's limit_s)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tar", type=Path, default=None, help="pack OUT into this .tgz at the end")
    parser.add_argument("--wheels", type=Path, default=None, help="folder of wheels to install first")
    parser.add_argument("--cache", default="/tmp/cacheC", help="build cache shared by the steps")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=["build", "kernels", "harness"])
    parser.add_argument("--ab", nargs="+", type=Path, default=None, metavar="PATCH",
                        help="A/B these patches first (adds the ab step) and keep the best kept one")
    parser.add_argument("--cases", nargs="+", default=None, help="kernel_ab.py --cases")
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], help="kernel_ab.py --dtypes")
    parser.add_argument("--rounds", type=int, default=3, help="kernel_ab.py --rounds")
    parser.add_argument("--decide", default=None, help="kernel_ab.py --decide (required with --ab)")
    parser.add_argument("--phase-variants", nargs="+", type=Path, default=[], metavar="PATCH",
                        help="the phase step also clocks this tree with each patch applied under the probe "
                             f"(about {PHASE_VARIANT_S} s each)")
    args = parser.parse_args(argv)
    # The steps apply patches inside scratch trees, so a path relative to this tree must not reach them as such.
    args.ab = [patch.resolve() for patch in args.ab] if args.ab else args.ab
    args.phase_variants = [patch.resolve() for patch in args.phase_variants]
    if args.ab and not args.decide:
        parser.exit(2, "device_call: --ab needs --decide KERNEL (e.g. _fa) to pick the tree that goes on\n")
    return args


def main() -> int:
    args = parse_args()
    start = time.monotonic()
    left = lambda: args.limit - (time.monotonic() - start)  # noqa: E731
    if args.wheels:
        install_wheels(args.wheels)
    clear_output(args.out)
    steps = (["ab"] if args.ab else []) + [s for s in args.steps if s != "ab"]
    estimates = dict(ESTIMATES, phase=ESTIMATES["phase"] + PHASE_VARIANT_S * len(args.phase_variants))
    log: list[dict] = []

    def run(name: str, command: list[str], env: dict | None = None) -> int:
        began = time.monotonic()
        code = run_until(command, args.out / f"{name}.log", left() - MARGIN, env=env)
        log.append({"step": name, "exit": code, "seconds": round(time.monotonic() - began, 1),
                    "hash": sources_hash()})
        (args.out / "steps.json").write_text(json.dumps(log, indent=1) + "\n")
        print(f"{name}: exit {code} after {log[-1]['seconds']} s, {left():.0f} s left", flush=True)
        return code

    cache_env = dict(os.environ, FUSIONSEARCH_CACHE_DIR=args.cache)
    for step in steps:
        if not plan([step], left(), estimates):
            print(f"{step}: skipped, {left():.0f} s left and it usually takes {estimates[step]} s", flush=True)
            log.append({"step": step, "skipped": True, "left_s": round(left())})
            continue
        if step == "ab":
            command = [sys.executable, "experiments/kernel_ab.py", "--patch", *map(str, args.ab), "--out",
                       str(args.out / "ab"), "--rounds", str(args.rounds), "--dtypes", *args.dtypes,
                       "--decide", args.decide, *(["--cases", *args.cases] if args.cases else [])]
            if run("ab", command) == 0:
                verdict = json.loads((args.out / "ab" / "verdict.json").read_text())
                kept = kept_variant(verdict)
                if kept:
                    patch = next(p for p in args.ab if p.stem == kept).resolve()
                    result = apply_patch(patch, ROOT)
                    if result.returncode:
                        raise SystemExit(f"device_call: the kept {patch} does not apply: {result.stderr.strip()}")
                log[-1]["kept"] = kept
        elif step == "build":
            began = time.monotonic()
            logs = [open(args.out / f"build-{dtype}.log", "w") for dtype in ("fp16", "bf16")]
            jobs = [subprocess.Popen([sys.executable, "-c", BUILD, dtype], cwd=ROOT, env=cache_env, stdout=out,
                                     stderr=subprocess.STDOUT) for dtype, out in zip(("fp16", "bf16"), logs)]
            codes = []
            for job in jobs:
                try:
                    codes.append(job.wait(timeout=max(1.0, left() - MARGIN)))
                except subprocess.TimeoutExpired:
                    job.kill()
                    codes.append(124)
            for out in logs:
                out.close()
            log.append({"step": "build", "exit": max(codes), "seconds": round(time.monotonic() - began, 1),
                        "hash": sources_hash()})
            print(f"build: exit codes {codes}", flush=True)
        elif step in ("kernels", "harness"):
            tests = "tests/test_kernels_gpu.py" if step == "kernels" else "tests/test_bench_gpu.py"
            run(step, [sys.executable, "experiments/gpu_suite.py", "--skip-builds", "--cache", args.cache,
                       "--out", str(args.out / "suite"), f"--suffix=-{step}", "--pytest-args", tests])
        elif step == "report":
            stem = args.out / "perf" / f"perf-{gpu_tag()}"
            stem.parent.mkdir(exist_ok=True)
            run("report", [sys.executable, "experiments/perf_report.py", "--extra-masks", "32768", "48996", "48934",
                           "48932", "--out", str(stem)], env=cache_env)
        elif step == "phase":
            for variant in [None, *args.phase_variants]:
                name = "phase" if variant is None else f"phase-{variant.stem}"
                scratch = Path(tempfile.mkdtemp(prefix="phase-"))
                try:
                    tree = probed_copy(scratch / "tree", variant)
                except SystemExit as error:  # e.g. a patch kept by the A/B touched the same lines
                    print(f"{name}: skipped, {error}", flush=True)
                    log.append({"step": name, "skipped": True, "reason": str(error)})
                    continue
                out = args.out / "phase" / (variant.stem if variant else "")
                run(name, [sys.executable, str(tree / "experiments" / "phase_clock.py"), "--cases",
                           *(args.cases or ["1x32:32768"]), "--dtypes", *args.dtypes, "--out", str(out)],
                    env=tree_env(tree, scratch / "cache"))
    (args.out / "steps.json").write_text(json.dumps(log, indent=1) + "\n")
    if args.tar:
        with tarfile.open(args.tar, "w:gz") as tar:
            tar.add(args.out, arcname=args.out.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
