"""The 16-bit mask codec: parse, decode to a Plan, the seed text format, JSON."""
from __future__ import annotations

import itertools
import re

from .errors import MaskError
from .ops import NUM_OPS
from .plan import ATTENTION_BIT, Plan

MASK_BITS = 16
MAX_MASK = (1 << MASK_BITS) - 1
_FORMS = "an integer 0 … 65535, 0b… or 0x… of at most 16 bits, or a 16-character string of 0s and 1s"


def parse_mask(value: "int | str") -> int:
    """Turn an integer, '0b…', '0x…', a decimal string or a 16-character bit string into 0…65535."""
    if isinstance(value, bool):
        raise MaskError(f"mask {value!r} is a boolean; give {_FORMS}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            if re.fullmatch(r"[01]{16}", text):
                number = int(text, 2)
            elif re.fullmatch(r"0[bB][01]+", text):
                number = int(text[2:], 2)
            elif re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
                number = int(text[2:], 16)
            elif re.fullmatch(r"[+-]?\d+", text):
                number = int(text)
            else:
                raise ValueError
        except ValueError:
            raise MaskError(f"mask {value!r} is malformed; give {_FORMS}") from None
        if re.fullmatch(r"[01]+", text) and len(text) > MASK_BITS and len(text) != 16:
            raise MaskError(f"mask {value!r} has {len(text)} binary digits, more than 16; give {_FORMS}")
    else:
        raise MaskError(f"mask {value!r} has type {type(value).__name__}; give {_FORMS}")
    if not 0 <= number <= MAX_MASK:
        raise MaskError(f"mask {value!r} is out of range 0 … {MAX_MASK}; give {_FORMS}")
    return number


def mask_bits(value: int) -> str:
    """The mask as 16 characters, pos0 first."""
    return format(parse_mask(value), "016b")


def runs(value: int) -> list[tuple[int, int]]:
    """Maximal runs of equal bits over pos1…pos15, as (first, last) operator indices."""
    bits = mask_bits(value)[1:]
    spans, start = [], 0
    for key, group in itertools.groupby(range(NUM_OPS), key=lambda i: bits[i]):
        length = len(list(group))
        spans.append((start, start + length - 1))
        start += length
    return spans


def decode(value: "int | str") -> Plan:
    """Mask → Plan: runs of equal bits are segments; with pos0 = 1 every segment touching ops 2–5 joins one."""
    number = parse_mask(value)
    attention = bool(number >> ATTENTION_BIT & 1)
    cuts = {first for first, _ in runs(number)[1:]}
    return Plan.from_cuts(cuts, attention=attention)


def canonical_mask(value: "int | str") -> int:
    """The canonical mask of the plan a mask denotes (complements and attention-inner bits removed)."""
    return decode(value).mask


def to_seed(value: "int | str") -> str:
    """The seed text format: value pos0 count start_1 end_1 … (fused segments, mask positions 1…15)."""
    number = parse_mask(value)
    plan = decode(number)
    fields = [number, number >> ATTENTION_BIT & 1, len(plan.fused_segments)]
    for seg in plan.fused_segments:
        fields.extend(seg.positions)
    return " ".join(map(str, fields))


def to_json(value: "int | str") -> dict:
    """A JSON-ready description of the plan a mask denotes."""
    number = parse_mask(value)
    plan = decode(number)
    return {
        "mask": number,
        "bits": mask_bits(number),
        "attention": plan.attention,
        "canonical_mask": plan.mask,
        "kernel_count": plan.kernel_count,
        "segments": [
            {"first_op": s.first, "last_op": s.last, "positions": list(s.positions), "fused": s.fused,
             "attention_kernel": s.attention, "ops": list(s.op_names), "kernel": s.name}
            for s in plan.segments
        ],
        "seed": to_seed(number),
    }
