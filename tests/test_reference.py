"""The 15-operator PyTorch reference and LayerWeights: equal to nn.TransformerEncoderLayer and HF BertLayer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusionsearch.config import LayerConfig
from fusionsearch.errors import ConfigError, FusionSearchError, PlanError
from fusionsearch.ops import NUM_OPS, OPS, tensor_shape
from fusionsearch.reference import (OP_FUNCTIONS, additive_key_mask, error_budget, reference_forward,
                                    reference_layer, relative_error, run_ops)
from fusionsearch.weights import TENSOR_NAMES, LayerWeights, expected_shapes

SMALL = dict(heads=2, head_size=32, ffn=128)


def torch_layer(hidden: int, heads: int, ffn: int, seed: int = 0, **kwargs) -> nn.TransformerEncoderLayer:
    torch.manual_seed(seed)
    options = dict(dropout=0.0, activation="gelu", batch_first=True, norm_first=False) | kwargs
    layer = nn.TransformerEncoderLayer(d_model=hidden, nhead=heads, dim_feedforward=ffn, **options).eval()
    # Default init leaves biases at 0 and LayerNorm at (1, 0); perturb them so a dropped term shows.
    with torch.no_grad():
        for param in layer.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return layer


def padding(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    """nn-style key padding mask (True = ignore): some keys of some batches, never every key of a batch."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.rand(batch, seq_len, generator=gen) < 0.4
    pad[-1, seq_len // 2:] = True       # right padding, as tokenizers produce
    pad[:, 0] = False                   # never all keys
    if batch > 1:
        pad[0] = False                  # one batch without padding
    assert pad.any(), "the test must actually mask something"
    return pad


def hf_bert_layer(hidden: int, heads: int, ffn: int, hidden_act: str = "gelu", eps: float = 1e-12):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn,
                                     hidden_act=hidden_act, layer_norm_eps=eps, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    layer = transformers.models.bert.modeling_bert.BertLayer(config).eval()
    # Unit-scale activations (weights ~ 1/fan_in, LayerNorm γ near 1) so every operator's error shows in the output.
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("LayerNorm.weight"):
                param.normal_(1.0, 0.1)
            elif param.dim() == 1:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return config, layer


def hf_extended_mask(config, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The additive mask HF's own code builds for an eager encoder layer."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56 builds it with the older helper
        from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask
        return _prepare_4d_attention_mask(attention_mask, hidden_states.dtype)
    return create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask)


# --- the reference against PyTorch and Hugging Face -------------------------------------------------------------

@pytest.mark.parametrize("hidden, heads, ffn, batch, seq_len", [
    (64, 2, 128, 3, 7),        # small, odd sequence length
    (768, 12, 3072, 1, 5),     # BERT-base
])
def test_reference_equals_nn_transformer_encoder_layer_with_padding(hidden, heads, ffn, batch, seq_len):
    layer = torch_layer(hidden, heads, ffn)
    weights = LayerWeights.from_torch(layer)
    cfg = weights.config_for(batch, seq_len, heads)
    x = torch.randn(batch, seq_len, hidden)
    pad = padding(batch, seq_len)
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=pad)
    actual = reference_forward(x, ~pad, weights, cfg)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5)


def test_reference_equals_nn_layer_without_mask():
    layer = torch_layer(64, 2, 128, seed=3)
    weights = LayerWeights.from_torch(layer)
    cfg = weights.config_for(2, 9, 2)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(reference_forward(x, None, weights, cfg), expected, rtol=1e-5, atol=2e-5)


def test_reference_equals_hf_bert_layer_with_extended_attention_mask():
    config, layer = hf_bert_layer(64, 2, 128)
    weights = LayerWeights.from_hf(layer)
    cfg = weights.config_for(3, 7, 2)
    x = torch.randn(3, 7, 64)
    mask = (~padding(3, 7)).long()
    with torch.no_grad():
        expected = layer(x, attention_mask=hf_extended_mask(config, x, mask))
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(reference_forward(x, mask, weights, cfg), expected, rtol=1e-5, atol=2e-5)


def test_hf_state_dict_with_model_prefix_gives_the_same_weights():
    _, layer = hf_bert_layer(64, 2, 128)
    prefixed = {f"bert.encoder.layer.0.{k}": v for k, v in layer.state_dict().items()}
    direct = LayerWeights.from_hf(layer)
    loaded = LayerWeights.from_state_dict(prefixed, prefix="bert.encoder.layer.0")
    for name in TENSOR_NAMES:
        assert torch.equal(getattr(loaded, name), getattr(direct, name)), name
    assert loaded.eps == direct.eps == 1e-12


def test_state_dict_without_the_prefix_suggests_it():
    _, layer = hf_bert_layer(64, 2, 128)
    prefixed = {f"encoder.layer.3.{k}": v for k, v in layer.state_dict().items()}
    with pytest.raises(ConfigError, match="prefix='encoder.layer.3.'"):
        LayerWeights.from_state_dict(prefixed)


# --- masking ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_batch_row_gives_no_nan(dtype):
    weights = LayerWeights.random(LayerConfig(**SMALL, eps=1e-5), seed=2)
    cfg = weights.config_for(2, 6, 2)
    x = torch.randn(2, 6, 64) * 4   # large scores push fp16 masked keys towards -inf
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    env = reference_layer(x, mask, weights, cfg, compute_dtype=dtype)
    for name in ("scores_masked", "probs", "out"):
        assert torch.isfinite(env[name]).all(), f"{name} holds NaN or inf in {dtype}"
    if dtype == torch.float32:
        # HF semantics: every key gets the same finite minimum, so the row's softmax is uniform.
        torch.testing.assert_close(env["probs"][1], torch.full_like(env["probs"][1], 1 / 6))


def test_additive_key_mask_is_zero_for_attended_keys_and_finite_min_for_padding():
    mask = torch.tensor([[1, 1, 0], [True, False, True]]).bool()
    for given in (mask, mask.long(), mask.float()):
        additive = additive_key_mask(given, torch.float16)
        assert additive.shape == (2, 1, 1, 3) and additive.dtype == torch.float16
        expected = torch.where(mask, 0.0, torch.finfo(torch.float16).min).to(torch.float16)[:, None, None, :]
        assert torch.equal(additive, expected)
    assert additive_key_mask(None, torch.float32) is None


def test_mask_of_the_wrong_shape_raises_config_error():
    weights = LayerWeights.random(LayerConfig(**SMALL))
    cfg = weights.config_for(2, 5, 2)
    with pytest.raises(ConfigError, match=r"\[2, 4\]"):
        reference_layer(torch.randn(2, 5, 64), torch.ones(2, 4), weights, cfg)
    with pytest.raises(ConfigError, match="must be"):
        additive_key_mask(torch.ones(2, 1, 1, 5), torch.float32)


# --- operator structure -----------------------------------------------------------------------------------------

def test_every_operator_output_has_the_shape_ops_declares():
    weights = LayerWeights.random(LayerConfig(**SMALL))
    cfg = weights.config_for(3, 7, 2)
    env = reference_layer(torch.randn(3, 7, 64), torch.ones(3, 7), weights, cfg)
    assert len(OP_FUNCTIONS) == NUM_OPS
    for op in OPS:
        assert tuple(env[op.output].shape) == tensor_shape(op.output, cfg), op.output


@pytest.mark.parametrize("split", [1, 2, 6, 9, 14])
def test_running_operators_in_two_pieces_equals_one_run(split):
    weights = LayerWeights.random(LayerConfig(**SMALL), seed=5)
    cfg = weights.config_for(2, 5, 2)
    full = reference_layer(torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), weights, cfg)
    start = {"x": full["x"], "attention_mask": full["attention_mask"]}
    pieces = run_ops(split, NUM_OPS - 1, run_ops(0, split - 1, start, weights, cfg), weights, cfg)
    for op in OPS:
        assert torch.equal(pieces[op.output], full[op.output]), op.output
    assert set(start) == {"x", "attention_mask"}, "run_ops must not change the caller's env"


def test_run_ops_from_the_middle_needs_the_earlier_tensors():
    weights = LayerWeights.random(LayerConfig(**SMALL))
    cfg = weights.config_for(2, 5, 2)
    with pytest.raises(PlanError, match="'probs'"):
        run_ops(5, 9, {"x": torch.randn(10, 64), "attention_mask": None}, weights, cfg)
    with pytest.raises(PlanError, match="0…14"):
        run_ops(3, 15, {}, weights, cfg)


def test_reference_accepts_tokens_layout_and_rejects_wrong_shapes():
    weights = LayerWeights.random(LayerConfig(**SMALL))
    cfg = weights.config_for(2, 5, 2)
    x = torch.randn(2, 5, 64)
    flat = reference_layer(x.reshape(10, 64), None, weights, cfg)["out"]
    assert torch.equal(flat, reference_layer(x, None, weights, cfg)["out"])
    with pytest.raises(ConfigError, match=r"\[2, 6, 64\]"):
        reference_layer(torch.randn(2, 6, 64), None, weights, cfg)


def test_compute_dtype_runs_the_whole_chain_in_that_dtype():
    weights = LayerWeights.random(LayerConfig(**SMALL), seed=1)
    cfg = weights.config_for(2, 5, 2)
    env = reference_layer(torch.randn(2, 5, 64), None, weights, cfg, compute_dtype=torch.bfloat16)
    assert {env[op.output].dtype for op in OPS} == {torch.bfloat16}
    fp32 = reference_forward(env["x"].float().view(2, 5, 64), None, weights, cfg)
    assert fp32.dtype == torch.float32


# --- error budget -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def outputs():
    """fp32 reference and PyTorch's own fp16 and bf16 outputs of one random layer."""
    weights = LayerWeights.random(LayerConfig(**SMALL), seed=7)
    cfg = weights.config_for(3, 97, 2)
    x = torch.randn(3, 97, 64)
    mask = ~padding(3, 97)
    return {dtype: reference_forward(x, mask, weights, cfg, dtype)
            for dtype in (torch.float32, torch.float16, torch.bfloat16)}


def test_low_precision_pytorch_output_is_within_its_own_budget(outputs):
    ref = outputs[torch.float32]
    for dtype in (torch.float16, torch.bfloat16):
        budget = error_budget(ref, outputs[dtype], outputs[dtype])
        assert budget.ok and 0 < budget.eager_error < 0.05, budget


def test_candidate_with_three_times_pytorch_error_fails(outputs):
    ref, eager = outputs[torch.float32], outputs[torch.float16]
    candidate = ref + 3 * (eager.float() - ref)
    budget = error_budget(ref, eager, candidate)
    assert not budget.ok
    assert math.isclose(budget.candidate_error, 3 * budget.eager_error, rel_tol=1e-3)


def test_nan_never_passes_the_error_budget(outputs):
    ref, eager = outputs[torch.float32], outputs[torch.float16]
    poisoned = ref.clone()
    poisoned[1, 50, 3] = float("nan")
    assert not error_budget(ref, eager, poisoned).ok
    assert not error_budget(ref, eager, torch.full_like(ref, float("inf"))).ok
    assert not error_budget(ref, poisoned, ref).ok


def test_zero_pytorch_error_uses_the_floor(outputs):
    ref = outputs[torch.float32]
    assert error_budget(ref, ref, ref * (1 + 1e-6)).ok
    assert not error_budget(ref, ref, ref * (1 + 1e-3)).ok


def test_error_budget_refuses_mismatched_shapes(outputs):
    ref = outputs[torch.float32]
    with pytest.raises(FusionSearchError, match="reshape"):
        relative_error(ref.reshape(-1, 64), ref)


# --- LayerWeights -----------------------------------------------------------------------------------------------

def test_weights_fields_are_the_parameters_in_operator_order():
    names = [n for op in OPS for n in op.inputs if n in TENSOR_NAMES]
    assert tuple(dict.fromkeys(names)) == TENSOR_NAMES


def test_random_weights_have_config_shapes_and_realistic_scales():
    cfg = LayerConfig(**SMALL)
    weights = LayerWeights.random(cfg, seed=4)
    weights.check(cfg)
    shapes = expected_shapes(cfg)
    assert {n: tuple(t.shape) for n, t in weights.tensors().items()} == shapes
    assert abs(weights.w_qkv.std().item() - 64 ** -0.5) < 0.02
    assert abs(weights.ln1_w.mean().item() - 1.0) < 0.05 and weights.ln1_w.std() > 0
    assert 0 < weights.b_ffn1.abs().mean() < 0.1
    same = LayerWeights.random(cfg, seed=4)
    other = LayerWeights.random(cfg, seed=5)
    assert torch.equal(same.w_o, weights.w_o) and not torch.equal(other.w_o, weights.w_o)


def test_to_converts_every_tensor_and_keeps_eps():
    weights = LayerWeights.random(LayerConfig(**SMALL, eps=1e-6))
    half = weights.to(dtype=torch.float16)
    assert {t.dtype for t in half.tensors().values()} == {torch.float16}
    assert half.eps == 1e-6 and weights.w_qkv.dtype == torch.float32
    assert {t.dtype for t in half.to(dtype="bf16").tensors().values()} == {torch.bfloat16}


def test_config_for_matches_the_weights():
    weights = LayerWeights.random(LayerConfig(heads=4, head_size=64, ffn=1024, eps=1e-5))
    cfg = weights.config_for(8, 128, 4, "fp16")
    assert (cfg.hidden, cfg.ffn, cfg.eps, cfg.dtype, cfg.shape_text) == (256, 1024, 1e-5, "fp16", "8x128")
    assert weights.config_for(1, 1, 4).dtype == "fp32"


def test_check_names_the_mismatched_weight():
    weights = LayerWeights.random(LayerConfig(**SMALL))
    with pytest.raises(ConfigError, match=r"w_qkv has shape \[192, 64\].*needs \[384, 128\]"):
        weights.check(LayerConfig(heads=4, head_size=32, ffn=128))
    with pytest.raises(ConfigError, match=r"w_ffn1 has shape \[128, 64\].*needs \[256, 64\]"):
        weights.check(LayerConfig(heads=2, head_size=32, ffn=256))
    with pytest.raises(ConfigError, match="eps"):
        weights.check(LayerConfig(**SMALL, eps=1e-5))


@pytest.mark.parametrize("kwargs, named", [
    ({"norm_first": True}, "norm_first"),
    ({"activation": "relu"}, "activation"),
    ({"activation": nn.GELU(approximate="tanh")}, "approximate='tanh'"),
])
def test_unsupported_torch_layer_raises_config_error_naming_it(kwargs, named):
    layer = torch_layer(64, 2, 128, **kwargs)
    with pytest.raises(ConfigError, match=named):
        LayerWeights.from_torch(layer)


def test_exact_gelu_module_and_bias_free_layer_are_accepted():
    layer = torch_layer(64, 2, 128, activation=nn.GELU(), bias=False)
    weights = LayerWeights.from_torch(layer)
    assert not weights.b_qkv.any() and not weights.ln2_b.any()
    cfg = weights.config_for(2, 3, 2)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(reference_forward(x, None, weights, cfg), expected, rtol=1e-5, atol=2e-5)


def test_hf_layer_with_tanh_gelu_raises_config_error():
    _, layer = hf_bert_layer(64, 2, 128, hidden_act="gelu_new")
    with pytest.raises(ConfigError, match="gelu_new"):
        LayerWeights.from_hf(layer)
