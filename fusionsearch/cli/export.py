"""`fusionsearch export`: write the best (or a given) plan as a self-contained Python module."""
from __future__ import annotations

import json
from pathlib import Path

from .. import settings
from ..config import LayerConfig, parse_shape
from ..errors import FusionSearchError
from ..mask import decode


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a fusion plan as a drop-in Python module",
        description="Write one self-contained Python module (CUDA sources, headers, runtime embedded) that runs "
                    "a fusion plan as a drop-in encoder layer. Pick the plan by mask, as the fastest ok plan of "
                    "the shape in a records file, or from a search output folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mask", help="the plan's mask (integer, 0b…, 0x… or 16-character bit string)")
    source.add_argument("--records", type=Path, help="measurement records (JSONL); the fastest ok plan wins")
    source.add_argument("--from-search", type=Path, metavar="DIR", help="a `fusionsearch search --out` folder")
    parser.add_argument("--shape", default=f"{settings.DEFAULT_BATCH}x{settings.DEFAULT_SEQ_LEN}",
                        help="BxS the plan was tuned for (default: %(default)s)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default=settings.DEFAULT_DTYPE)
    parser.add_argument("--heads", type=int, default=settings.DEFAULT_HEADS)
    parser.add_argument("--head-size", type=int, default=settings.DEFAULT_HEAD_SIZE)
    parser.add_argument("--ffn", type=int, default=settings.DEFAULT_FFN)
    parser.add_argument("--eps", type=float, default=settings.DEFAULT_EPS)
    parser.add_argument("-o", "--output", type=Path, required=True, help="NAME.py to write")
    parser.set_defaults(handler=run)


def _best_from_records(path: Path, cfg: LayerConfig) -> tuple[int, dict]:
    from ..records import load_frame
    frame = load_frame(path, allow_foreign=True)
    rows = frame[(frame["kind"] == "plan") & (frame["status"] == "ok") & (frame["batch"] == cfg.batch)
                 & (frame["seq_len"] == cfg.seq_len) & (frame["dtype"] == cfg.dtype)]
    if rows.empty:
        raise FusionSearchError(f"{path} has no ok plan records for shape {cfg.shape_text} {cfg.dtype}; measure "
                                "some with `fusionsearch bench` or choose another --shape")
    best = rows.loc[rows["latency_us"].idxmin()]
    return int(best["mask"]), {"gpu": str(best.get("gpu_name", "?")), "latency_us": float(best["latency_us"]),
                               "records": str(path)}


def _best_from_search(folder: Path) -> tuple[int, dict]:
    path = folder / "best.json"
    if not path.exists():
        raise FusionSearchError(f"{folder} has no best.json; give the --out folder of `fusionsearch search`")
    data = json.loads(path.read_text())
    best = data["best"]
    return int(best["mask"]), {"latency_us": best.get("latency_us"), "search_shape": data["layer"]["shape"],
                               "search_strategy": data.get("strategy")}


def run(args) -> int:
    from ..export import default_provenance, export_plan

    batch, seq_len = parse_shape(args.shape)
    cfg = LayerConfig(batch=batch, seq_len=seq_len, heads=args.heads, head_size=args.head_size, ffn=args.ffn,
                      dtype=args.dtype, eps=args.eps)
    tuned: dict = {}
    if args.mask is not None:
        mask = decode(args.mask).mask
    elif args.records is not None:
        mask, tuned = _best_from_records(args.records, cfg)
    else:
        mask, tuned = _best_from_search(args.from_search)
    plan = decode(mask)
    arch = _arch_or_default()
    provenance = {**default_provenance(arch), **{f"tuned_{k}": v for k, v in tuned.items()}, "shape": cfg.shape_text}
    path = export_plan(plan, cfg, args.output, arch, provenance)
    print(f"wrote {path} (mask {plan.mask}, {plan.kernel_count} kernels: {plan.describe()})")
    return 0


def _arch_or_default() -> str:
    """The visible GPU's arch, else sm_90 (the sources build for any sm_80+ GPU at import time)."""
    from ..build import BuildError, current_arch
    try:
        return current_arch()
    except BuildError:
        return "90"
