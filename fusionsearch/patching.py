"""Replace every encoder layer of a model in place with a fused layer running one plan, keeping its weights."""
from __future__ import annotations

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


class _HFLayerAdapter(nn.Module):
    """Takes a Hugging Face layer's call (hidden_states, extended mask, …) and returns what that layer returns."""

    def __init__(self, fused: nn.Module, returns_tuple: bool):
        super().__init__()
        self.fused, self.returns_tuple = fused, returns_tuple

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from .runtime import attend_mask
        dtype = hidden_states.dtype
        out = self.fused(hidden_states.to(self.fused.dtype).contiguous(), attend_mask(attention_mask)).to(dtype)
        return (out,) if self.returns_tuple else out


class _TorchLayerAdapter(nn.Module):
    """Takes nn.TransformerEncoder's call to a layer (src, src_mask, src_key_padding_mask, is_causal)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src_mask is not None or is_causal:
            raise ConfigError("the fused layer supports key padding masks only, not src_mask or is_causal; "
                              "pass src_key_padding_mask instead")
        attend = None if src_key_padding_mask is None else ~src_key_padding_mask.to(torch.bool)
        dtype = src.dtype
        return self.fused(src.to(self.fused.dtype).contiguous(), attend).to(dtype)


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
    for name in report.replaced:
        module = model.get_submodule(name)
        if isinstance(module, nn.TransformerEncoderLayer):
            _set_child(model, name, _TorchLayerAdapter(builder(module, torch_layer=True)))
        else:
            _set_child(model, name, _HFLayerAdapter(builder(module, torch_layer=False), _hf_returns_tuple()))
    return report


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
