"""`fusionsearch translate MASK`: show the plan a 16-bit mask denotes."""
from __future__ import annotations

from .. import mask as codec
from .output import add_format_argument, print_json, print_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "translate", help="translate a 16-bit fusion mask into its segments",
        description="Translate a fusion mask (integer, 0b…, 0x… or 16-character bit string, pos0 first) "
                    "into the fused segments it denotes.")
    parser.add_argument("mask", help="the mask, e.g. 6826, 0x1aaa or 0001101010101010")
    add_format_argument(parser, choices=("table", "seed", "json"))
    parser.set_defaults(handler=run)


def run(args) -> int:
    value = codec.parse_mask(args.mask)
    if args.format == "seed":
        print(codec.to_seed(value))
        return 0
    data = codec.to_json(value)
    if args.format == "json":
        print_json(data)
        return 0
    print(f"mask {data['mask']} = {data['bits']} (canonical {data['canonical_mask']}), "
          f"attention kernel: {'on' if data['attention'] else 'off'}, {data['kernel_count']} kernels")
    rows = []
    for seg in data["segments"]:
        first, last = seg["positions"]
        kind = "hand-written attention" if seg["attention_kernel"] else ("fused" if seg["fused"] else "single")
        rows.append([f"{first}–{last}" if seg["fused"] else f"{first}", kind, " + ".join(seg["ops"])])
    print_table(["positions", "kernel", "operators"], rows)
    return 0
