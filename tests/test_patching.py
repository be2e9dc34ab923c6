"""patch()'s layer adapters on CPU stand-ins: one mask conversion per model call, none kept past it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionsearch import runtime
from fusionsearch.patching import MaskBiasCache, _HFLayerAdapter, _TorchLayerAdapter, share_mask_bias


class FusedStandIn(nn.Module):
    """The fused layer's interface (dtype, forward with mask or mask_bias), recording what each call got."""

    def __init__(self, takes_bias: bool = True):
        super().__init__()
        self.dtype, self.calls = torch.float32, []
        if not takes_bias:
            self.forward = self.forward_mask_only

    def forward(self, x, attention_mask=None, *, mask_bias=None):
        self.calls.append(("bias", mask_bias))
        return x + 1

    def forward_mask_only(self, x, attention_mask=None):
        self.calls.append(("mask", attention_mask))
        return x + 1


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, mask, fail_after: int | None = None):
        for i, layer in enumerate(self.layers):
            if fail_after == i:
                raise RuntimeError("a layer failed")
            x = layer(x, mask)
        return x


@pytest.fixture
def conversions(monkeypatch):
    made = []

    def counting_key_bias(attend):
        made.append(attend)
        return torch.where(attend.to(torch.bool), 0.0, torch.finfo(torch.float32).min).to(torch.float32)

    monkeypatch.setattr(runtime, "key_bias", counting_key_bias)
    return made


def _hf_stack(n: int, takes_bias: bool = True):
    stand_ins = [FusedStandIn(takes_bias) for _ in range(n)]
    stack = Stack([])
    cache = share_mask_bias(stack)
    stack.layers.extend(_HFLayerAdapter(f, returns_tuple=False, cache=cache) for f in stand_ins)
    return stack, stand_ins, cache


def _extended_mask(valid: list[int], seq: int) -> torch.Tensor:
    attend = torch.zeros(len(valid), seq)
    for row, n in enumerate(valid):
        attend[row, :n] = 1
    return ((1.0 - attend)[:, None, None, :] * torch.finfo(torch.float32).min)  # HF's extended additive mask


def test_a_model_call_converts_its_mask_once_and_every_layer_gets_that_bias(conversions):
    stack, stand_ins, cache = _hf_stack(3)
    mask = _extended_mask([5, 3], 5)
    out = stack(torch.zeros(2, 5, 4), mask)
    assert torch.equal(out, torch.full((2, 5, 4), 3.0))
    assert len(conversions) == 1 and conversions[0].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    biases = [f.calls[0][1] for f in stand_ins]
    assert all(b is biases[0] for b in biases) and biases[0][1, 3] == torch.finfo(torch.float32).min
    assert not cache.active and cache.bias is None  # nothing kept past the call
    stack(torch.zeros(2, 5, 4), mask)  # the same mask object again: converted again, in the new call
    assert len(conversions) == 2


def test_outside_a_model_call_each_layer_converts_its_own_mask(conversions):
    stack, _, _ = _hf_stack(2)
    mask = _extended_mask([2], 4)
    for layer in stack.layers:
        layer(torch.zeros(1, 4, 4), mask)
    assert len(conversions) == 2


def test_a_call_that_raises_still_ends_the_cache(conversions):
    stack, _, cache = _hf_stack(3)
    with pytest.raises(RuntimeError, match="a layer failed"):
        stack(torch.zeros(1, 4, 4), _extended_mask([2], 4), fail_after=2)
    assert not cache.active and cache.mask is None and len(conversions) == 1


def test_a_new_mask_object_in_the_same_call_is_converted_anew_and_none_stays_none():
    cache = MaskBiasCache()
    cache.begin()
    first, second = torch.ones(1, 3), torch.ones(1, 3)
    made = []
    assert cache.bias_for(None, made.append) is None
    cache.bias_for(first, lambda m: made.append(m) or "bias 1")
    assert cache.bias_for(first, lambda m: made.append(m) or "again") == "bias 1"
    assert cache.bias_for(second, lambda m: made.append(m) or "bias 2") == "bias 2"
    assert made == [first, second]


def test_layers_exported_before_mask_bias_get_the_attend_mask(conversions):
    stack, stand_ins, _ = _hf_stack(2, takes_bias=False)
    stack(torch.zeros(1, 4, 4), _extended_mask([3], 4))
    assert not conversions
    assert [kind for f in stand_ins for kind, _ in f.calls] == ["mask", "mask"]
    assert stand_ins[0].calls[0][1].tolist() == [[True, True, True, False]]


def test_torch_encoder_layers_take_the_padding_mask_inverted(conversions):
    fused = FusedStandIn()
    adapter = _TorchLayerAdapter(fused, MaskBiasCache())
    padding = torch.tensor([[False, False, True]])
    adapter(torch.zeros(1, 3, 4), src_key_padding_mask=padding)
    assert conversions[0].tolist() == [[True, True, False]]
    with pytest.raises(Exception, match="key padding masks only"):
        adapter(torch.zeros(1, 3, 4), src_mask=torch.zeros(3, 3))
