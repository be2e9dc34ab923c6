"""Replace every encoder layer of a model in place with a fused layer running one plan, keeping its weights."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, FusionSearchError
from .mask import decode
from .plan import Plan


@dataclass
class PatchReport:
    """What patch() replaced (or, on a dry run, would replace) and what it left alone and why."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    applied: bool = True

    def __str__(self) -> str:
        verb = "replaced" if self.applied else "would replace"
        lines = [f"{verb} {len(self.replaced)} layer(s): {', '.join(self.replaced) or '-'}"]
        lines += [f"left alone {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _is_hf_encoder_layer(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("attention", "intermediate", "output")) and \
        hasattr(getattr(module, "attention"), "self")


def _why_unsupported(name: str, module: nn.Module) -> str | None:
    """None if `module` is a layer the kernels implement, else the reason it is not."""
    from .weights import LayerWeights
    try:
        if isinstance(module, nn.TransformerEncoderLayer):
            LayerWeights.from_torch(module)
        else:
            if getattr(module, "is_decoder", False) or getattr(module, "add_cross_attention", False):
                return "decoder or cross-attention layers are not an encoder layer"
            LayerWeights.from_hf(module)
    except FusionSearchError as error:
        return str(error)
    return None


class MaskBiasCache:
    """The key bias of the mask one call of a patched model hands each of its layers: made by the first layer and
    reused by the rest, which then launch none of its kernels. It serves only between `begin` and `end`, which patch()
    hooks around every call of the model: a bias made while a CUDA graph is captured holds its values only when
    that graph replays, so it must not outlive the call. Outside a model call every layer converts its own mask."""

    def __init__(self):
        self.active, self.mask, self.bias = False, None, None

    def begin(self, *_) -> None:
        self.active, self.mask, self.bias = True, None, None

    def end(self, *_) -> None:
        self.active, self.mask, self.bias = False, None, None

    def bias_for(self, mask: "torch.Tensor | None", make) -> "torch.Tensor | None":
        """make(mask), or what it gave for this very mask object earlier in the same model call."""
        if mask is None:
            return None
        if not self.active:
            return make(mask)
        if self.mask is not mask:
            self.mask, self.bias = mask, make(mask)
        return self.bias


def _takes_mask_bias(fused: nn.Module) -> bool:
    # Modules exported before mask_bias existed take the mask only.
    return "mask_bias" in inspect.signature(fused.forward).parameters


class _LayerAdapter(nn.Module):
    """Runs the fused layer on a padding mask in the attend form, converted once per model call where it can."""

    def __init__(self, fused: nn.Module, cache: MaskBiasCache):
        super().__init__()
        self.fused, self.cache, self.biased = fused, cache, _takes_mask_bias(fused)

    def run(self, hidden_states: torch.Tensor, mask, attend) -> torch.Tensor:
        """The fused layer on hidden_states; `attend(mask)` gives the [B, S] mask with 1 = attend."""
        from .runtime import key_bias
        x = hidden_states.to(self.fused.dtype).contiguous()
        if self.biased:
            out = self.fused(x, mask_bias=self.cache.bias_for(mask, lambda m: key_bias(attend(m))))
        else:
            out = self.fused(x, None if mask is None else attend(mask))
        return out.to(hidden_states.dtype)


class _HFLayerAdapter(_LayerAdapter):
    """Takes a Hugging Face layer's call (hidden_states, extended mask, …) and returns what that layer returns."""

    def __init__(self, fused: nn.Module, returns_tuple: bool, cache: MaskBiasCache):
        super().__init__(fused, cache)
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from .runtime import attend_mask
        out = self.run(hidden_states, attention_mask, attend_mask)
        return (out,) if self.returns_tuple else out


class _TorchLayerAdapter(_LayerAdapter):
    """Takes nn.TransformerEncoder's call to a layer (src, src_mask, src_key_padding_mask, is_causal)."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src_mask is not None or is_causal:
            raise ConfigError("the fused layer supports key padding masks only, not src_mask or is_causal; "
                              "pass src_key_padding_mask instead")
        return self.run(src, src_key_padding_mask, lambda padding: ~padding.to(torch.bool))


def _hf_returns_tuple() -> bool:
    try:
        import transformers
        return int(transformers.__version__.split(".")[0]) < 5
    except ImportError:
        return False


def _candidates(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) or _is_hf_encoder_layer(module):
            yield name, module


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def patch(model: nn.Module, plan_or_module, dtype: str = "fp16", dry_run: bool = False,
          cuda_graphs: bool = False) -> PatchReport:
    """Swap every supported encoder layer of `model` (HF BertModel / RoBERTa-style, nn.TransformerEncoder) for
    a fused layer running `plan_or_module` (a Plan, a mask, or an exported module); unsupported layers stay with a
    warning. Without CUDA, on a CPU model, or with dry_run, only reports what it would replace."""
    report = PatchReport()
    for name, module in list(_candidates(model)):
        reason = _why_unsupported(name, module)
        if reason:
            report.skipped[name] = reason
        else:
            report.replaced.append(name)
    for name, reason in report.skipped.items():
        warnings.warn(f"fusionsearch.patch leaves {name} ({type(model.get_submodule(name)).__name__}) alone: {reason}")
    on_gpu = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
    if dry_run or not on_gpu:
        report.applied = False
        if not dry_run:
            warnings.warn("fusionsearch.patch: the model is not on a CUDA GPU, so nothing was replaced; "
                          f"{report}")
        return report
    builder = _layer_builder(plan_or_module, dtype, cuda_graphs)
    cache = share_mask_bias(model)
    for name in report.replaced:
        module = model.get_submodule(name)
        if isinstance(module, nn.TransformerEncoderLayer):
            _set_child(model, name, _TorchLayerAdapter(builder(module, torch_layer=True), cache))
        else:
            _set_child(model, name, _HFLayerAdapter(builder(module, torch_layer=False), _hf_returns_tuple(), cache))
    return report


def share_mask_bias(model: nn.Module) -> MaskBiasCache:
    """A mask-bias cache that serves the layers of `model` during each of its calls (hooks on the model; the
    closing one runs even when the call raises)."""
    cache = MaskBiasCache()
    model.register_forward_pre_hook(cache.begin)
    model.register_forward_hook(cache.end, always_call=True)
    return cache


def _layer_builder(plan_or_module, dtype: str, cuda_graphs: bool):
    """A function layer → fused layer, sharing one compiled library across all layers."""
    exported = getattr(plan_or_module, "FusedEncoderLayer", None)
    if exported is not None:
        def build_exported(module, torch_layer):
            maker = exported.from_torch if torch_layer else exported.from_hf
            fused = maker(module, cuda_graphs=cuda_graphs)
            fused.dtype = fused.layer.dtype
            return fused
        return build_exported

    from .runtime import FusedEncoderLayer, KernelLibrary
    from .weights import LayerWeights
    plan = plan_or_module if isinstance(plan_or_module, Plan) else decode(plan_or_module)
    libraries: dict = {}

    def build(module, torch_layer):
        if torch_layer:
            weights, heads = LayerWeights.from_torch(module), module.self_attn.num_heads
        else:
            weights, heads = LayerWeights.from_hf(module), module.attention.self.num_attention_heads
        cfg = weights.config_for(1, 1, heads, dtype=dtype)
        key = tuple(sorted(cfg.kernel_signature().items()))
        if key not in libraries:
            libraries[key] = KernelLibrary.get(cfg, plan.segments)
        return FusedEncoderLayer(plan, weights, cfg, library=libraries[key], cuda_graphs=cuda_graphs)
    return build
