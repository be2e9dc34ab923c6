"""What starting a kernel under the previous one gains: each plan timed in every launch-overlap mode (serial;
programmatic dependent launch as the previous kernel's blocks exit; as soon as they all run), alternately, in
one process, on the same rotated weight/input sets.

    PYTHONPATH=. python experiments/overlap_ab.py --shapes 1x32 1x128 --masks 49003 48932 [--rounds 3] [--out F.json]

Every plan is first checked against the fp32 reference in each mode (NaN-poisoned buffers), and its outputs in all
modes must be equal bit for bit (the kernels are deterministic; only launch timing
differs). Timing is the sweep's: CUDA events over CUDA-graph replays with weights and inputs rotated past the L2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


MODES = {0: "serial", 1: "at_exit", 2: "at_start"}


def measure(shape: str, masks: list[int], rounds: int, dtype: str) -> list[dict]:
    import torch

    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.mask import decode
    from fusionsearch.sweep import _Rig

    batch, seq = parse_shape(shape)
    cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
    rig = _Rig(cfg, 0, decode(masks[0]))
    rows = []
    for mask in masks:
        plan = decode(mask)
        rig.switch(plan)
        checks = {}
        for mode in MODES:
            rig.library.set_launch_overlap(mode)
            checks[mode] = rig.check()
        same = _same_output(rig)
        times = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode in MODES:
                rig.library.set_launch_overlap(mode)
                times[mode].append(rig.time(rig.launchers())["median"])
        rig.library.set_launch_overlap(1)
        row = {"shape": shape, "dtype": dtype, "mask": mask, "segments": [s.name for s in plan.segments],
               "ok": all(c.ok for c in checks.values()), "error": max(c.candidate_error for c in checks.values()),
               "same_output": same}
        for mode, name in MODES.items():
            row[f"{name}_us"] = statistics.median(times[mode])
            row[f"{name}_rounds"] = times[mode]
        rows.append(row)
        print(f"{shape} {mask:5d} " + "  ".join(f"{name} {row[name + '_us']:8.1f}" for name in MODES.values())
              + f" µs  ok={row['ok']} same={same}", flush=True)
        torch.cuda.synchronize()
    return rows


def _same_output(rig) -> bool:
    """Run set 0 in every launch mode; the outputs must match exactly."""
    import torch

    layer, x, mask, _ = rig.sets[0]
    outs = []
    for mode in MODES:
        rig.library.set_launch_overlap(mode)
        out = torch.full_like(x, float("nan"))
        layer.run_into(x, mask, out)
        outs.append(out)
    rig.library.set_launch_overlap(1)
    return all(torch.equal(outs[0], out) for out in outs[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", required=True)
    parser.add_argument("--masks", nargs="+", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    rows = [row for shape in args.shapes for row in measure(shape, args.masks, args.rounds, args.dtype)]
    if args.out:
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    return 0 if all(r["ok"] and r["same_output"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
