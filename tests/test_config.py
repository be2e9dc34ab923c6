"""LayerConfig validation: every rejection names the value, the limit and the fix."""
from __future__ import annotations

import pytest
import torch

from fusionsearch.config import LayerConfig, normalize_dtype, parse_shape
from fusionsearch.errors import ConfigError
from fusionsearch.ops import OPS, layer_flops, tensor_shape


def test_default_config_is_bert_base_at_16x128():
    cfg = LayerConfig()
    assert (cfg.hidden, cfg.heads, cfg.ffn, cfg.shape_text, cfg.dtype) == (768, 12, 3072, "16x128", "fp16")
    assert cfg.tokens == 16 * 128


@pytest.mark.parametrize("kwargs, named", [
    ({"batch": 0}, "batch 0"),
    ({"batch": True}, "batch True"),
    ({"seq_len": 2048}, "seq_len 2048"),
    ({"seq_len": 1.5}, "seq_len 1.5"),
    ({"head_size": 48}, "head_size 48"),
    ({"heads": 0}, "heads 0"),
    ({"ffn": 3070}, "ffn 3070"),
    ({"ffn": 4}, "ffn 4"),
    ({"eps": 0.0}, "eps 0.0"),
    ({"dtype": "int8"}, "'int8'"),
])
def test_invalid_config_raises_config_error_naming_the_value(kwargs, named):
    with pytest.raises(ConfigError) as caught:
        LayerConfig(**kwargs)
    assert named in str(caught.value)
    assert ";" in str(caught.value), "the message must say how to fix it"


def test_seq_len_limit_follows_max_seq_len():
    assert LayerConfig(seq_len=2048, max_seq_len=2048).seq_len == 2048
    with pytest.raises(ConfigError, match="1024"):
        LayerConfig(seq_len=1025)


def test_ffn_not_multiple_of_8_suggests_the_padded_size():
    with pytest.raises(ConfigError, match="3072"):
        LayerConfig(ffn=3065)


@pytest.mark.parametrize("spelling", ["fp16", "float16", "half", torch.float16, "torch.float16"])
def test_dtype_spellings_normalise_to_fp16(spelling):
    assert normalize_dtype(spelling) == "fp16"
    assert LayerConfig(dtype=spelling).dtype == "fp16"


def test_from_hidden_splits_hidden_into_heads():
    cfg = LayerConfig.from_hidden(1024, 16, batch=2, seq_len=9)
    assert (cfg.heads, cfg.head_size, cfg.hidden) == (16, 64, 1024)


def test_from_hidden_rejects_indivisible_heads():
    with pytest.raises(ConfigError, match="hidden 768 is not divisible by heads 7"):
        LayerConfig.from_hidden(768, 7)


@pytest.mark.parametrize("text, shape", [("16x128", (16, 128)), (" 3 X 97 ", (3, 97)), ("1×32", (1, 32))])
def test_shape_text_parses(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["16", "16x", "x128", "a x b", "16x128x3", "-1x5"])
def test_malformed_shape_raises_config_error_naming_it(text):
    with pytest.raises(ConfigError, match=repr(text).replace("(", r"\(")):
        parse_shape(text)


def test_with_shape_keeps_kernel_signature_and_config_is_frozen():
    cfg = LayerConfig()
    other = cfg.with_shape(3, 97)
    assert other.kernel_signature() == cfg.kernel_signature()
    assert (other.batch, other.seq_len) == (3, 97)
    with pytest.raises(AttributeError):
        cfg.batch = 2  # type: ignore[misc]


def test_operator_tensor_shapes_chain_with_matching_element_counts():
    cfg = LayerConfig(batch=3, seq_len=7, heads=2, head_size=32, ffn=128)
    assert tensor_shape("qkv_heads", cfg) == (3, 3, 2, 7, 32)
    assert tensor_shape("w_ffn1", cfg) == (128, 64)
    produced = {"x", "attention_mask"}
    for op in OPS:
        for name in op.inputs:
            assert name in produced or name.startswith(("w_", "b_", "ln")), f"{op.name} reads {name} before it exists"
        produced.add(op.output)
    assert layer_flops(cfg) > 0
