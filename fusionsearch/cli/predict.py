"""`fusionsearch predict MASK --shape BxS --model F`: a saved cost model's latency and high/low class of one plan."""
from __future__ import annotations

from pathlib import Path

from .output import add_format_argument, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict a plan's latency and high/low class with a saved cost model",
        description="Predict the latency of the plan a mask denotes with a cost model saved by `fusionsearch "
                    "search` (model.json under --out), and its class: 1 (high) if it is predicted among the "
                    "fastest q % of all plans of the shape, else 0. --format seed prints exactly 'value class'.")
    parser.add_argument("mask", help="the mask, e.g. 6826, 0x1aaa or 0001101010101010")
    parser.add_argument("--shape", required=True, help="batch x sequence length, e.g. 16x128")
    parser.add_argument("--model", required=True, type=Path, help="cost model file (model.json)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"),
                        help="element type (default: the one the model was trained on)")
    add_format_argument(parser, choices=("table", "json", "seed"))
    parser.set_defaults(handler=run)


def run(args) -> int:
    from .. import mask as codec
    from ..config import parse_shape
    from ..costmodel import XGBCostModel

    value = codec.parse_mask(args.mask)
    batch, seq_len = parse_shape(args.shape)
    model = XGBCostModel.load(args.model)
    cfg = model.default_config(batch, seq_len, args.dtype)
    predicted = float(model.predict([value], cfg)[0])
    threshold = model.threshold_us(cfg)
    high = int(predicted <= threshold)
    if args.format == "seed":
        print(f"{value} {high}")
        return 0
    data = {"mask": value, "canonical_mask": codec.canonical_mask(value), "shape": cfg.shape_text,
            "dtype": cfg.dtype, "hidden": cfg.hidden, "heads": cfg.heads, "ffn": cfg.ffn,
            "predicted_us": predicted, "class": high, "q": model.q, "threshold_us": threshold,
            "model": str(args.model), "plan": codec.to_json(value)}
    if args.format == "json":
        print_json(data)
        return 0
    plan = codec.decode(value)
    label = "high (among the fastest" if high else "low (outside the fastest"
    print(f"mask {value} = {codec.mask_bits(value)} (canonical {data['canonical_mask']}), {cfg.shape_text} "
          f"{cfg.dtype}: {plan.describe()}")
    print(f"predicted latency: {predicted:.1f} µs")
    print(f"class: {high} = {label} {model.q:g} % predicted for {cfg.shape_text}; threshold {threshold:.1f} µs)")
    return 0
