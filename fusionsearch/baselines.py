"""PyTorch implementations of the layer that plans must beat, built on fixed inputs, plus the roofline ceilings."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerConfig
from .errors import FusionSearchError
from .ops import roofline_floor_us
from .reference import additive_key_mask
from .weights import LayerWeights, torch_dtype


class BaselineError(FusionSearchError):
    """A baseline that does not exist or cannot run here."""


@dataclass
class Inputs:
    """The tensors a built callable reads at call time; swapping them re-points the callable (and its capture)."""

    x: torch.Tensor                       # [B, S, H] hidden states
    attention_mask: torch.Tensor | None   # [B, S], 1 = attend, 0 = padding (Hugging Face)
    extra: dict = field(default_factory=dict)  # derived tensors builders cache per input set (additive masks)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, S] additive key mask, computed once per input set as HF computes it once per model."""
        if self.attention_mask is None:
            return None
        cached = self.extra.get(("additive", dtype))
        if cached is None or cached[0] is not self.attention_mask:
            cached = (self.attention_mask, additive_key_mask(self.attention_mask, dtype).contiguous())
            self.extra[("additive", dtype)] = cached
        return cached[1]

    def padding_mask(self) -> torch.Tensor | None:
        """[B, S] bool, True = padding: nn.TransformerEncoderLayer's src_key_padding_mask."""
        if self.attention_mask is None:
            return None
        cached = self.extra.get("padding")
        if cached is None or cached[0] is not self.attention_mask:
            cached = (self.attention_mask, self.attention_mask == 0)
            self.extra["padding"] = cached
        return cached[1]


@dataclass
class Built:
    """A measurement target: `run()` gives the layer output on the current inputs; `timed()` what to time."""

    run: Callable[[], torch.Tensor]
    timed: Callable[[], Callable[[], object]] | None = None  # called after run(); None = time run itself
    graph: bool = True  # time as CUDA-graph replays (False: eager launches from Python)
    poison: Callable[[], None] | None = None  # fill internal buffers with NaN before the checked run

    def target(self) -> Callable[[], object]:
        return self.run if self.timed is None else self.timed()


# ---------------------------------------------------------------- the PyTorch chain

def _chain(cfg: LayerConfig, use_sdpa: bool) -> Callable:
    """The layer in plain PyTorch (bias folded into F.linear, as nn and HF do); weights are arguments."""
    b, s, h, heads, d, eps = cfg.batch, cfg.seq_len, cfg.hidden, cfg.heads, cfg.head_size, cfg.eps
    scale = 1.0 / math.sqrt(d)

    def layer(x, add_mask, w_qkv, b_qkv, w_o, b_o, ln1_w, ln1_b, w_ffn1, b_ffn1, w_ffn2, b_ffn2, ln2_w, ln2_b):
        q, k, v = F.linear(x, w_qkv, b_qkv).view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        if use_sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if add_mask is not None:
                scores = scores + add_mask
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        a = F.layer_norm(F.linear(ctx, w_o, b_o) + x, (h,), ln1_w, ln1_b, eps)
        f = F.gelu(F.linear(a, w_ffn1, b_ffn1))
        return F.layer_norm(F.linear(f, w_ffn2, b_ffn2) + a, (h,), ln2_w, ln2_b, eps)

    return layer


def _bind(fn: Callable, weights: LayerWeights, inputs: Inputs, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    tensors = tuple(weights.tensors().values())
    return lambda: fn(inputs.x, inputs.additive_mask(dtype), *tensors)


def _check(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs) -> torch.dtype:
    weights.check(cfg)
    dtype = torch_dtype(cfg.dtype)
    if inputs.x.dtype != dtype or weights.dtype != dtype:
        raise BaselineError(f"baseline inputs are {inputs.x.dtype} and weights {weights.dtype} but the config says "
                            f"{cfg.dtype}; cast both with .to(dtype={dtype})")
    return dtype


def build_eager(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """The chain op by op in the layer's dtype."""
    return _bind(_chain(cfg, False), weights, inputs, _check(cfg, weights, inputs))


def build_sdpa(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """The chain with F.scaled_dot_product_attention for operators 2–5."""
    return _bind(_chain(cfg, True), weights, inputs, _check(cfg, weights, inputs))


def build_nn_fastpath(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """nn.TransformerEncoderLayer in eval under no_grad with a key padding mask: PyTorch's fused fast path."""
    dtype = _check(cfg, weights, inputs)
    layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.ffn, dropout=0.0, activation="gelu",
                                       layer_norm_eps=cfg.eps, batch_first=True, norm_first=False,
                                       device=weights.device, dtype=dtype)
    with torch.no_grad():
        for param, value in ((layer.self_attn.in_proj_weight, weights.w_qkv),
                             (layer.self_attn.in_proj_bias, weights.b_qkv),
                             (layer.self_attn.out_proj.weight, weights.w_o), (layer.self_attn.out_proj.bias, weights.b_o),
                             (layer.norm1.weight, weights.ln1_w), (layer.norm1.bias, weights.ln1_b),
                             (layer.linear1.weight, weights.w_ffn1), (layer.linear1.bias, weights.b_ffn1),
                             (layer.linear2.weight, weights.w_ffn2), (layer.linear2.bias, weights.b_ffn2),
                             (layer.norm2.weight, weights.ln2_w), (layer.norm2.bias, weights.ln2_b)):
            param.copy_(value)
    layer.eval().requires_grad_(False)

    def run():
        with torch.no_grad():
            return layer(inputs.x, src_key_padding_mask=inputs.padding_mask())

    run.module = layer
    return run


_compiled: dict = {}


def _compiled_chain(cfg: LayerConfig, mode: str | None) -> Callable:
    # One compiled function per (shape, mode): weights are arguments, so K weight sets share one compilation.
    key = (cfg, mode)
    if key not in _compiled:
        # Every shape adds a guard entry on the same code object; past Dynamo's limit of 8 it would quietly
        # run eager code and "compile" would time eager. A worker that sweeps many shapes needs more room.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        _compiled[key] = torch.compile(_chain(cfg, False), mode=mode, dynamic=False, fullgraph=True)
    return _compiled[key]


def build_compile(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs, mode: str | None = None):
    """torch.compile of the eager chain for this shape (compiled here, on the first call, not when timed)."""
    run = _bind(_compiled_chain(cfg, mode), weights, inputs, _check(cfg, weights, inputs))
    run()
    return run


def build_compile_max_autotune(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs):
    """torch.compile with max-autotune GEMM search; without its own CUDA graphs so timing can capture one."""
    return build_compile(cfg, weights, inputs, mode="max-autotune-no-cudagraphs")


def build_hf_bert(cfg: LayerConfig, weights: LayerWeights, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """Hugging Face BertLayer (its default SDPA attention) with these weights and the extended additive mask."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    dtype = _check(cfg, weights, inputs)
    config = BertConfig(hidden_size=cfg.hidden, num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
                        hidden_act="gelu", layer_norm_eps=cfg.eps, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    layer = BertLayer(config)
    h = cfg.hidden
    state = {
        "attention.self.query.weight": weights.w_qkv[:h], "attention.self.query.bias": weights.b_qkv[:h],
        "attention.self.key.weight": weights.w_qkv[h:2 * h], "attention.self.key.bias": weights.b_qkv[h:2 * h],
        "attention.self.value.weight": weights.w_qkv[2 * h:], "attention.self.value.bias": weights.b_qkv[2 * h:],
        "attention.output.dense.weight": weights.w_o, "attention.output.dense.bias": weights.b_o,
        "attention.output.LayerNorm.weight": weights.ln1_w, "attention.output.LayerNorm.bias": weights.ln1_b,
        "intermediate.dense.weight": weights.w_ffn1, "intermediate.dense.bias": weights.b_ffn1,
        "output.dense.weight": weights.w_ffn2, "output.dense.bias": weights.b_ffn2,
        "output.LayerNorm.weight": weights.ln2_w, "output.LayerNorm.bias": weights.ln2_b,
    }
    missing, _ = layer.load_state_dict(state, strict=False)
    if missing:
        raise BaselineError(f"BertLayer of this transformers version has parameters {missing} that fusionsearch "
                            f"does not fill; pin transformers to a version whose BertLayer matches BERT's")
    layer = layer.to(device=weights.device, dtype=dtype).eval().requires_grad_(False)

    def run():
        with torch.no_grad():
            out = layer(inputs.x, attention_mask=inputs.additive_mask(dtype))
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple

    run.module = layer
    return run


@dataclass(frozen=True)
class Baseline:
    """A named PyTorch implementation: how to build it and how to time it."""

    name: str
    build: Callable
    graph: bool           # timed as CUDA-graph replays (needs CUDA)
    requires: str | None  # an optional package it needs
    default: bool         # part of the default set ("--baselines" without names)


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("eager", build_eager, False, None, True),
    Baseline("eager_graph", build_eager, True, None, True),
    Baseline("sdpa", build_sdpa, False, None, True),
    Baseline("sdpa_graph", build_sdpa, True, None, True),
    Baseline("nn_fastpath", build_nn_fastpath, False, None, True),
    Baseline("compile", build_compile, False, None, True),
    Baseline("compile_graph", build_compile, True, None, True),
    Baseline("compile_max_autotune", build_compile_max_autotune, True, None, False),
    Baseline("hf_bert", build_hf_bert, False, "transformers", True),
    Baseline("hf_bert_graph", build_hf_bert, True, "transformers", True),
)}


def get(name: str) -> Baseline:
    if name not in BASELINES:
        raise BaselineError(f"baseline {name!r} does not exist; choose from {', '.join(BASELINES)}")
    return BASELINES[name]


def unavailable_reason(name: str, device: "torch.device | str") -> str | None:
    """Why a baseline cannot run on `device` here, or None if it can."""
    baseline = get(name)
    if baseline.graph and torch.device(device).type != "cuda":
        return f"baseline {name} times CUDA-graph replays and needs a CUDA device, not {device}"
    if baseline.requires and importlib.util.find_spec(baseline.requires) is None:
        return f"baseline {name} needs the package {baseline.requires}; pip install 'fusionsearch[hf]'"
    return None


def default_names(device: "torch.device | str" = "cuda") -> list[str]:
    """The default baseline set that can run here (max-autotune only when asked: it compiles for minutes)."""
    return [n for n, b in BASELINES.items() if b.default and unavailable_reason(n, device) is None]


def build(name: str, cfg: LayerConfig, weights: LayerWeights, inputs: Inputs) -> Built:
    """Build baseline `name` on `inputs` (read at call time) with `weights` in cfg.dtype."""
    reason = unavailable_reason(name, inputs.x.device)
    if reason:
        raise BaselineError(reason)
    baseline = get(name)
    return Built(run=baseline.build(cfg, weights, inputs), graph=baseline.graph)


# ---------------------------------------------------------------- ceilings and the floor

def floor_us(cfg: LayerConfig, peak_tflops: float, bandwidth_tbs: float) -> float:
    """The roofline floor of one layer: max(FLOPs / peak, minimum bytes / bandwidth) in µs."""
    return roofline_floor_us(cfg, peak_tflops, bandwidth_tbs)


@cache
def measure_ceilings(dtype: str = "fp16", matmul_n: int = 8192, copy_bytes: int = 1 << 30) -> dict:
    """Measured matmul TFLOP/s (n³ in `dtype`) and device-to-device copy TB/s (read + write), once per process.

    The copy is timed two ways and the faster counts: a captured `copy_` (a graph memcpy node, which the driver
    may hand to a copy engine) and an elementwise kernel on the SMs, the path every kernel of a layer streams
    through."""
    from .timing import time_cuda_graph

    if not torch.cuda.is_available():
        raise BaselineError("measuring ceilings needs a CUDA GPU and torch.cuda.is_available() is False")
    tdtype = torch_dtype(dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=tdtype, generator=gen)
    b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=tdtype, generator=gen)
    out = torch.empty_like(a)
    matmul = time_cuda_graph(lambda: torch.matmul(a, b, out=out), min_repeats=10, max_repeats=30, target_ms=100)
    src = torch.randn(copy_bytes // 4, device="cuda", generator=gen)
    dst = torch.empty_like(src)
    memcpy = time_cuda_graph(lambda: dst.copy_(src), min_repeats=10, max_repeats=30, target_ms=100)
    sm_copy = time_cuda_graph(lambda: torch.mul(src, 1.0, out=dst), min_repeats=10, max_repeats=30, target_ms=100)
    copy_us = min(memcpy["median"], sm_copy["median"])
    return {"peak_tflops": 2 * matmul_n ** 3 / (matmul["median"] * 1e-6) / 1e12,
            "bandwidth_tbs": 2 * (copy_bytes // 4) * 4 / (copy_us * 1e-6) / 1e12,
            "matmul_us": matmul["median"], "copy_us": copy_us, "memcpy_us": memcpy["median"],
            "sm_copy_us": sm_copy["median"], "dtype": dtype}
