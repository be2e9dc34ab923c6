"""PyTorch baselines compute the reference layer (fp32 on the CPU, tiny config); graph ones need CUDA."""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from fusionsearch import baselines, ops
from fusionsearch.config import LayerConfig
from fusionsearch.reference import error_budget, reference_forward
from fusionsearch.weights import LayerWeights
from fusionsearch.worker import draw_inputs

CFG = LayerConfig(batch=3, seq_len=9, heads=2, head_size=32, ffn=128, dtype="fp32")
HAS_HF = importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def weights():
    return LayerWeights.random(CFG, seed=3)


def within_budget(name, weights, seed):
    inputs = draw_inputs(CFG, seed, "cpu")
    run = baselines.build(name, CFG, weights, inputs).run
    ref = reference_forward(inputs.x, inputs.attention_mask, weights, CFG)
    out = run()
    # Swap in a fresh draw: the built callable must read the inputs at call time, not at build time.
    fresh = draw_inputs(CFG, seed + 1, "cpu")
    inputs.x, inputs.attention_mask = fresh.x, fresh.attention_mask
    ref2 = reference_forward(fresh.x, fresh.attention_mask, weights, CFG)
    return error_budget(ref, ref, out), error_budget(ref2, ref2, run())


@pytest.mark.parametrize("name", ["eager", "sdpa", "nn_fastpath",
                                  pytest.param("hf_bert", marks=pytest.mark.skipif(not HAS_HF,
                                                                                   reason="transformers absent"))])
def test_baseline_matches_the_fp32_reference_on_fresh_padded_inputs(name, weights):
    first, second = within_budget(name, weights, seed=11)
    assert first.ok, first.reason
    assert second.ok, second.reason
    assert first.candidate_error < 1e-5 and second.candidate_error < 1e-5


def test_a_baseline_with_a_dropped_bias_fails_the_budget(weights):
    # The check the worker runs must catch a subtly wrong implementation, not only NaN.
    broken = LayerWeights(**{**weights.tensors(), "b_ffn2": weights.b_ffn2 * 0, "eps": weights.eps})
    inputs = draw_inputs(CFG, 4, "cpu")
    out = baselines.build("eager", CFG, broken, inputs).run()
    ref = reference_forward(inputs.x, inputs.attention_mask, weights, CFG)
    assert not error_budget(ref, ref, out).ok


def test_padding_changes_the_output_so_the_mask_is_really_applied(weights):
    inputs = draw_inputs(CFG, 5, "cpu")
    assert (inputs.attention_mask == 0).any() and (inputs.attention_mask == 1).any()
    for name in ("eager", "sdpa", "nn_fastpath"):
        masked = baselines.build(name, CFG, weights, inputs).run()
        unmasked = baselines.build(name, CFG, weights, baselines.Inputs(inputs.x, None)).run()
        assert (masked - unmasked).abs().max() > 1e-3, name


def test_nn_fastpath_really_takes_the_fused_fast_path(weights):
    inputs = draw_inputs(CFG, 6, "cpu")
    run = baselines.build("nn_fastpath", CFG, weights, inputs).run
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    names = {event.name for event in prof.events()}
    assert "aten::_transformer_encoder_layer_fwd" in names


def test_compile_builder_traces_the_chain_as_one_graph(weights, monkeypatch):
    # Inductor on the CPU takes ~30 s; the eager backend still proves the chain compiles with fullgraph=True.
    monkeypatch.setattr(baselines.torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(baselines, "_compiled", {})
    first, second = within_budget("compile", weights, seed=21)
    assert first.ok and second.ok, (first.reason, second.reason)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", [n for n, b in baselines.BASELINES.items() if b.graph])
def test_graph_baselines_refuse_the_cpu(name, weights):
    with pytest.raises(baselines.BaselineError, match="needs a CUDA device"):
        baselines.build(name, CFG, weights, draw_inputs(CFG, 0, "cpu"))
    assert name not in baselines.default_names("cpu")


def test_registry_covers_the_documented_names_and_rejects_others():
    from fusionsearch.records import BASELINE_NAMES

    assert set(baselines.BASELINES) == set(BASELINE_NAMES)
    assert "compile_max_autotune" not in baselines.default_names("cuda")
    with pytest.raises(baselines.BaselineError, match="does not exist; choose from eager"):
        baselines.get("tensorrt")


def test_dtype_mismatch_is_refused_with_the_fix(weights):
    inputs = draw_inputs(CFG, 0, "cpu")
    with pytest.raises(baselines.BaselineError, match=r"cast both with \.to"):
        baselines.build("eager", CFG, weights.to(dtype=torch.float64), inputs)


def test_floor_is_the_roofline_of_ops():
    bert = LayerConfig(batch=16, seq_len=128)
    assert baselines.floor_us(bert, 767, 3.0) == ops.roofline_floor_us(bert, 767, 3.0)
    # DESIGN §6: 16×128 on the H100's measured ceilings has a floor near 38.8 µs.
    assert 30 < baselines.floor_us(bert, 767, 3.0) < 45


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_ceilings_need_cuda():
    with pytest.raises(baselines.BaselineError, match="needs a CUDA GPU"):
        baselines.measure_ceilings()
