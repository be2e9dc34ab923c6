"""The 16-bit mask codec: parsing, canonical plans, the seed text format."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusionsearch.errors import MaskError
from fusionsearch.mask import canonical_mask, decode, mask_bits, parse_mask, runs, to_json, to_seed
from fusionsearch.ops import NUM_OPS

masks = st.integers(min_value=0, max_value=0xFFFF)
ATTENTION_BIT = 1 << 15
OP_BITS = (1 << 15) - 1  # pos1…pos15


def op_bit(op: int) -> int:
    """Integer bit of operator `op` (mask position op + 1, MSB first)."""
    return 1 << (14 - op)


@given(masks)
def test_every_written_form_parses_back_to_the_same_mask(value):
    forms = [value, str(value), bin(value), hex(value), hex(value).upper().replace("0X", "0x"),
             format(value, "016b"), f"  {format(value, '016b')}  "]
    assert [parse_mask(form) for form in forms] == [value] * len(forms)
    assert parse_mask(mask_bits(value)) == value


def test_sixteen_character_bit_string_is_binary_not_decimal():
    assert parse_mask("0000000000000010") == 2


@given(masks)
def test_decoding_the_plans_mask_gives_the_same_plan(value):
    plan = decode(value)
    assert decode(plan.mask) == plan
    assert decode(plan.mask).mask == plan.mask


@given(masks)
def test_canonicalisation_is_idempotent(value):
    once = canonical_mask(value)
    assert canonical_mask(once) == once


@given(masks)
def test_complement_mask_is_same_plan(value):
    flipped = value ^ OP_BITS
    assert decode(flipped) == decode(value)
    assert canonical_mask(flipped) == canonical_mask(value)


@given(masks)
def test_canonical_mask_keeps_attention_flag_and_clears_first_operator_bit(value):
    canonical = canonical_mask(value)
    assert canonical & ATTENTION_BIT == value & ATTENTION_BIT
    assert canonical & op_bit(0) == 0


@given(masks, st.integers(min_value=0, max_value=15))
def test_attention_flag_keeps_ops_2_to_5_in_one_attention_segment_whatever_their_bits(value, flips):
    value |= ATTENTION_BIT
    flip = sum(op_bit(op) for i, op in enumerate(range(2, 6)) if flips >> i & 1)
    plan = decode(value ^ flip)
    attention = [s for s in plan.segments if s.attention]
    assert len(attention) == 1
    assert attention[0].first <= 2 and attention[0].last >= 5
    assert not [s for s in plan.segments if not s.attention and s.last >= 2 and s.first <= 5]


@given(masks, st.booleans(), st.booleans())
def test_attention_flag_ignores_bits_strictly_inside_the_attention_block(value, flip3, flip4):
    # Ops 3 and 4 have both neighbours inside ops 2–5, so their bits can only cut inside the block.
    value |= ATTENTION_BIT
    flipped = value ^ (op_bit(3) if flip3 else 0) ^ (op_bit(4) if flip4 else 0)
    assert decode(flipped) == decode(value)


@given(masks)
def test_without_attention_flag_segments_are_the_runs_of_equal_bits(value):
    value &= OP_BITS
    plan = decode(value)
    assert [(s.first, s.last) for s in plan.segments] == runs(value)
    assert plan.kernel_count == len(runs(value))
    assert not plan.attention


@given(masks)
def test_seed_format_lists_fused_segments_in_mask_positions(value):
    fields = [int(f) for f in to_seed(value).split()]
    plan = decode(value)
    assert fields[0] == value
    assert fields[1] == value >> 15
    assert fields[2] == len(plan.fused_segments) == (len(fields) - 3) // 2
    pairs = list(zip(fields[3::2], fields[4::2], strict=True))
    assert pairs == [(s.first + 1, s.last + 1) for s in plan.segments if s.last > s.first]
    assert all(1 <= a < b <= NUM_OPS for a, b in pairs)


@pytest.mark.parametrize("text, seed", [
    ("0001101010101010", "6826 0 2 1 2 3 4"),
    ("0000010101010101", "1365 0 1 1 4"),
])
def test_seed_worked_examples_from_the_design(text, seed):
    assert to_seed(text) == seed
    assert to_seed(int(seed.split()[0])) == seed


def test_all_masks_collapse_to_18432_canonical_plans():
    canonical = {canonical_mask(value) for value in range(1 << 16)}
    assert len(canonical) == 2 ** 14 + 2 ** 11 == 18432
    assert sum(1 for c in canonical if c & ATTENTION_BIT) == 2 ** 11


def test_json_description_agrees_with_the_plan():
    data = to_json("1001101010101010")
    plan = decode("1001101010101010")
    assert data["attention"] is True
    assert data["canonical_mask"] == plan.mask
    assert data["kernel_count"] == len(data["segments"]) == plan.kernel_count
    assert [s["attention_kernel"] for s in data["segments"]].count(True) == 1
    assert data["seed"] == to_seed("1001101010101010")


@pytest.mark.parametrize("bad", [-1, 65536, "1" * 17, "0" * 17, "abc", "0x1g", "", "  ", True, False, 3.0, None])
def test_bad_mask_raises_mask_error_naming_the_input(bad):
    with pytest.raises(MaskError) as caught:
        parse_mask(bad)
    assert repr(bad) in str(caught.value)


def test_mask_error_is_a_value_error_so_generic_callers_catch_it():
    with pytest.raises(ValueError):
        decode(70000)
