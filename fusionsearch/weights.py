"""LayerWeights: the parameters of one post-LayerNorm encoder layer, from PyTorch, Hugging Face or random."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerConfig, normalize_dtype
from .errors import ConfigError

# Field order = the order in which the 15 operators first read each parameter.
TENSOR_NAMES = ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b",
                "w_ffn1", "b_ffn1", "w_ffn2", "b_ffn2", "ln2_w", "ln2_b")

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Hugging Face activation names that mean the exact erf GELU (ACT2FN maps both to GELUActivation).
_ERF_GELU_NAMES = ("gelu", "gelu_python")


def torch_dtype(dtype: object) -> torch.dtype:
    """Map 'fp16', 'bfloat16', torch.float32 and friends to the torch dtype."""
    return _TORCH_DTYPES[normalize_dtype(dtype)]


def expected_shapes(cfg: LayerConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter for a config (nn.Linear layout [out, in])."""
    h, ff = cfg.hidden, cfg.ffn
    return {"w_qkv": (3 * h, h), "b_qkv": (3 * h,), "w_o": (h, h), "b_o": (h,), "ln1_w": (h,), "ln1_b": (h,),
            "w_ffn1": (ff, h), "b_ffn1": (ff,), "w_ffn2": (h, ff), "b_ffn2": (h,), "ln2_w": (h,), "ln2_b": (h,)}


def _is_erf_gelu(activation) -> bool:
    # Probing the function itself catches callables and modules whose name says nothing (nn.GELU('tanh')).
    if activation is F.gelu:
        return True
    if not callable(activation):
        return False
    probe = torch.linspace(-6.0, 6.0, 241)
    try:
        with torch.no_grad():
            result = activation(probe)
    except Exception:  # an activation that cannot even run on a tensor is not the exact GELU
        return False
    # tanh-approximate GELU differs from the erf form by up to 5e-4 on this range; float32 noise is ~1e-7.
    return isinstance(result, torch.Tensor) and result.shape == probe.shape and \
        bool((result.float() - F.gelu(probe)).abs().max() < 1e-5)


def _param(tensor: "torch.Tensor | None", size: int, like: torch.Tensor) -> torch.Tensor:
    # Layers built with bias=False have None where BERT has a bias; zeros compute the same layer.
    if tensor is None:
        return torch.zeros(size, dtype=like.dtype, device=like.device)
    return tensor.detach().clone()


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """Parameters of one encoder layer as tensors in nn.Linear layout ([out, in]) plus the LayerNorm eps."""

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    w_ffn1: torch.Tensor
    b_ffn1: torch.Tensor
    w_ffn2: torch.Tensor
    b_ffn2: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    eps: float

    @property
    def hidden(self) -> int:
        """H, read from w_qkv."""
        return int(self.w_qkv.shape[1])

    @property
    def ffn(self) -> int:
        """FF, read from w_ffn1."""
        return int(self.w_ffn1.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.w_qkv.dtype

    @property
    def device(self) -> torch.device:
        return self.w_qkv.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameter name → tensor, in TENSOR_NAMES order."""
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def to(self, device: "torch.device | str | None" = None,
           dtype: "torch.dtype | str | None" = None) -> "LayerWeights":
        """A new LayerWeights with every tensor (weights, biases, LayerNorm parameters) moved and/or cast."""
        target = None if dtype is None else (dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype))
        return replace(self, **{name: t.to(device=device, dtype=target) for name, t in self.tensors().items()})

    def check(self, cfg: LayerConfig) -> None:
        """Raise ConfigError unless every tensor has the shape `cfg` implies and eps equals cfg.eps."""
        for name, shape in expected_shapes(cfg).items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ConfigError(
                    f"weight {name} has shape {list(actual)} but the config (hidden {cfg.hidden} = {cfg.heads} heads "
                    f"× {cfg.head_size}, ffn {cfg.ffn}) needs {list(shape)}; build the config with "
                    f"weights.config_for(batch, seq_len, heads) or load weights of that model")
        devices = {t.device for t in self.tensors().values()}
        if len(devices) > 1:
            raise ConfigError(f"weights lie on several devices {sorted(map(str, devices))}; the layer needs them "
                              f"on one; call weights.to(device=...)")
        for name, tensor in self.tensors().items():
            if not tensor.is_floating_point():
                raise ConfigError(f"weight {name} has dtype {tensor.dtype}; a layer needs floating-point weights; "
                                  f"call weights.to(dtype=torch.float32)")
        if not math.isclose(self.eps, cfg.eps, rel_tol=1e-6):
            raise ConfigError(f"LayerNorm eps {self.eps} of the weights differs from the config's eps {cfg.eps}; "
                              f"build the config with weights.config_for(...) or LayerConfig(eps={self.eps})")

    def config_for(self, batch: int, seq_len: int, heads: int, dtype: "torch.dtype | str | None" = None,
                   **kwargs) -> LayerConfig:
        """A LayerConfig whose hidden, ffn and eps match these weights (dtype defaults to the weights' dtype)."""
        dtype = self.dtype if dtype is None else dtype
        cfg = LayerConfig.from_hidden(self.hidden, heads, batch=batch, seq_len=seq_len, ffn=self.ffn,
                                      dtype=normalize_dtype(dtype), eps=self.eps, **kwargs)
        self.check(cfg)
        return cfg

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "LayerWeights":
        """Weights of an nn.TransformerEncoderLayer(norm_first=False, activation='gelu')."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise ConfigError(f"layer of type {type(layer).__name__} is not an nn.TransformerEncoderLayer; "
                              f"use LayerWeights.from_hf for a Hugging Face BertLayer")
        if layer.norm_first:
            raise ConfigError("norm_first=True (pre-LayerNorm) is not supported; the kernels compute the "
                              "post-LayerNorm BERT layer; build the layer with norm_first=False")
        if not _is_erf_gelu(layer.activation):
            raise ConfigError(f"activation {layer.activation!r} is not supported; the kernels compute the exact "
                              f"erf GELU; build the layer with activation='gelu'")
        attn = layer.self_attn
        if not attn._qkv_same_embed_dim:
            raise ConfigError("self-attention with separate kdim/vdim is not supported; the kernels need one "
                              "packed [3H, H] projection; build the layer without kdim/vdim")
        if not math.isclose(layer.norm1.eps, layer.norm2.eps, rel_tol=1e-6):
            raise ConfigError(f"LayerNorm eps {layer.norm1.eps} and {layer.norm2.eps} differ; the kernels use one "
                              f"eps for both LayerNorms; give both norms the same eps")
        h, ff, like = attn.embed_dim, layer.linear1.out_features, attn.in_proj_weight
        return cls(
            w_qkv=_param(attn.in_proj_weight, 3 * h, like), b_qkv=_param(attn.in_proj_bias, 3 * h, like),
            w_o=_param(attn.out_proj.weight, h, like), b_o=_param(attn.out_proj.bias, h, like),
            ln1_w=_param(layer.norm1.weight, h, like), ln1_b=_param(layer.norm1.bias, h, like),
            w_ffn1=_param(layer.linear1.weight, ff, like), b_ffn1=_param(layer.linear1.bias, ff, like),
            w_ffn2=_param(layer.linear2.weight, h, like), b_ffn2=_param(layer.linear2.bias, h, like),
            ln2_w=_param(layer.norm2.weight, h, like), ln2_b=_param(layer.norm2.bias, h, like),
            eps=float(layer.norm1.eps))

    @classmethod
    def from_hf(cls, bert_layer) -> "LayerWeights":
        """Weights of a Hugging Face BertLayer (or a layer with the same structure, e.g. RoBERTa's)."""
        if getattr(bert_layer, "is_decoder", False) or getattr(bert_layer, "add_cross_attention", False):
            raise ConfigError("a decoder BertLayer (is_decoder or add_cross_attention) is not supported; the "
                              "kernels compute a bidirectional encoder layer; load the model as an encoder")
        self_attn = bert_layer.attention.self
        position = getattr(self_attn, "position_embedding_type", "absolute")
        if position != "absolute":
            raise ConfigError(f"position_embedding_type {position!r} is not supported; the kernels compute plain "
                              f"scaled dot-product attention; use a model with 'absolute' positions")
        config = getattr(self_attn, "config", None)
        act_name = getattr(config, "hidden_act", None)
        activation = bert_layer.intermediate.intermediate_act_fn
        erf = act_name in _ERF_GELU_NAMES if isinstance(act_name, str) else _is_erf_gelu(activation)
        if not erf:
            raise ConfigError(f"hidden_act {act_name or type(activation).__name__!r} is not supported; the kernels "
                              f"compute the exact erf GELU; use a model with hidden_act='gelu'")
        out_ln, ffn_ln = bert_layer.attention.output.LayerNorm, bert_layer.output.LayerNorm
        if not math.isclose(out_ln.eps, ffn_ln.eps, rel_tol=1e-6):
            raise ConfigError(f"LayerNorm eps {out_ln.eps} and {ffn_ln.eps} differ; the kernels use one eps for "
                              f"both LayerNorms; give both norms the same eps")
        return cls.from_state_dict(bert_layer.state_dict(), eps=float(out_ln.eps))

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", eps: float = 1e-12) -> "LayerWeights":
        """Weights from a BertLayer state dict; `prefix` like 'encoder.layer.0.'; eps is BERT's 1e-12 unless given."""
        if prefix and not prefix.endswith("."):
            prefix += "."

        def get(key: str) -> torch.Tensor:
            full = prefix + key
            if full not in sd:
                near = sorted(k for k in sd if k.endswith(key))
                if near:
                    raise ConfigError(f"state dict has no key {full!r} but has {near[0]!r}; "
                                      f"pass prefix={near[0][: -len(key)]!r}")
                raise ConfigError(f"state dict has no key {full!r} nor any key ending in {key!r}; "
                                  f"pass the state dict of a BertLayer (or its model with the layer's prefix)")
            return sd[full].detach().clone()

        qkv = [get(f"attention.self.{n}.weight") for n in ("query", "key", "value")]
        qkv_b = [get(f"attention.self.{n}.bias") for n in ("query", "key", "value")]
        return cls(
            w_qkv=torch.cat(qkv, 0), b_qkv=torch.cat(qkv_b, 0),
            w_o=get("attention.output.dense.weight"), b_o=get("attention.output.dense.bias"),
            ln1_w=get("attention.output.LayerNorm.weight"), ln1_b=get("attention.output.LayerNorm.bias"),
            w_ffn1=get("intermediate.dense.weight"), b_ffn1=get("intermediate.dense.bias"),
            w_ffn2=get("output.dense.weight"), b_ffn2=get("output.dense.bias"),
            ln2_w=get("output.LayerNorm.weight"), ln2_b=get("output.LayerNorm.bias"),
            eps=float(eps))

    @classmethod
    def random(cls, cfg: LayerConfig, seed: int = 0, device: "torch.device | str" = "cpu",
               dtype: torch.dtype = torch.float32) -> "LayerWeights":
        """Reproducible random weights at realistic scales for `cfg` (same values on every device)."""
        gen = torch.Generator().manual_seed(seed)
        h, ff = cfg.hidden, cfg.ffn

        def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * std + mean

        # Weights ~ N(0, 1/fan_in) keep activations at unit scale at every size, so attention scores are far
        # from uniform even in small test configs (BERT's N(0, 0.02) makes them nearly flat at H = 64).
        # Biases and LayerNorm parameters are off their init values so a kernel that drops one is caught.
        weights = cls(
            w_qkv=normal(3 * h, h, std=h ** -0.5), b_qkv=normal(3 * h, std=0.02),
            w_o=normal(h, h, std=h ** -0.5), b_o=normal(h, std=0.02),
            ln1_w=normal(h, std=0.05, mean=1.0), ln1_b=normal(h, std=0.02),
            w_ffn1=normal(ff, h, std=h ** -0.5), b_ffn1=normal(ff, std=0.02),
            w_ffn2=normal(h, ff, std=ff ** -0.5), b_ffn2=normal(h, std=0.02),
            ln2_w=normal(h, std=0.05, mean=1.0), ln2_b=normal(h, std=0.02),
            eps=float(cfg.eps))
        return weights.to(device=device, dtype=dtype)

