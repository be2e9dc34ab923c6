"""Check generated kernels against the fp32 reference on fresh random inputs with NaN-poisoned outputs."""
from __future__ import annotations

import torch

from .config import LayerConfig
from .ops import OPS
from .plan import Segment
from .reference import ErrorBudget, error_budget, reference_forward, reference_layer, run_ops
from .layout import SCORE_TENSORS, splitk_workspace, workspace_shape
from .runtime import FusedEncoderLayer, KernelLibrary, key_bias, run_segment
from .schedule import tensors_written
from .weights import LayerWeights, torch_dtype


def random_inputs(cfg: LayerConfig, seed: int, device="cuda", padding: bool = True):
    """Hidden states ~ N(0, 1) and an HF mask that pads a different number of trailing keys per batch entry."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.seq_len, cfg.hidden, generator=gen)
    mask = torch.ones(cfg.batch, cfg.seq_len, dtype=torch.int64)
    if padding:
        for b in range(cfg.batch):
            pad = (b * 37 + seed) % max(1, cfg.seq_len // 2 + 1)  # never every key of a row
            if pad:
                mask[b, cfg.seq_len - pad:] = 0
    return x.to(device), mask.to(device)


def verify_plan(layer: FusedEncoderLayer, weights: LayerWeights, cfg: LayerConfig, seed: int = 0,
                padding: bool = True) -> ErrorBudget:
    """Whole-layer check: the plan's output against fp32, within 2× PyTorch's own low-precision error."""
    x, mask = random_inputs(cfg, seed, padding=padding)
    dtype = torch_dtype(cfg.dtype)
    w32 = weights.to(device=x.device, dtype=torch.float32)
    ref = reference_forward(x, mask, w32, cfg, torch.float32)
    eager = reference_forward(x.to(dtype), mask, w32, cfg, dtype)
    layer.poison_workspace(cfg.batch, cfg.seq_len)
    out = torch.full_like(x, float("nan"), dtype=dtype)
    layer.run_into(x.to(dtype), mask, out)
    torch.cuda.synchronize()
    return error_budget(ref, eager, out)


def _fill(buffer: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if name in SCORE_TENSORS:
        buffer.zero_()  # probs padding columns must be zero; the others are never read there
        buffer[..., : value.shape[-1]].copy_(value)
    else:
        buffer.copy_(value.reshape(buffer.shape))


def verify_segment(library: KernelLibrary, segment: Segment, weights: LayerWeights, cfg: LayerConfig,
                   seed: int = 0) -> ErrorBudget:
    """One segment kernel alone: inputs from the reference, outputs poisoned, compared on its last output."""
    x, mask = random_inputs(cfg, seed)
    dtype = torch_dtype(cfg.dtype)
    w32 = weights.to(device=x.device, dtype=torch.float32)
    w_low = weights.to(device=x.device, dtype=dtype)
    env32 = reference_layer(x, mask, w32, cfg, torch.float32)
    env_low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in env32.items()}
    env_low["attention_mask"] = mask
    target = OPS[segment.last].output
    eager = run_ops(segment.first, segment.last, env_low, w_low, cfg)[target]
    reference = env32[target]

    tensors = {name: t.contiguous() for name, t in w_low.tensors().items()}
    tensors["x"] = env_low["x"].contiguous()
    tensors["key_bias"] = key_bias(mask)
    tensors.update(splitk_workspace(x.device))
    for op in OPS:
        buffer = torch.empty(workspace_shape(op.output, cfg), device=x.device, dtype=dtype)
        _fill(buffer, env_low[op.output], op.output)
        tensors[op.output] = buffer
    for name in tensors_written([segment]):
        tensors[name].fill_(float("nan"))
    run_segment(library, segment, tensors, cfg)
    torch.cuda.synchronize()
    candidate = tensors[target]
    if target in SCORE_TENSORS:
        candidate = candidate[..., : cfg.seq_len]
    candidate = candidate.reshape(reference.shape)
    if target == "scores_masked":
        # Masked keys hold the lowest value in each precision; compare the attended ones only.
        keep = mask.bool()[:, None, None, :].expand_as(reference)
        masked_ok = bool((candidate[~keep].float() <= torch.finfo(dtype).min / 2).all())
        reference, eager, candidate = (t.masked_fill(~keep, 0) for t in (reference, eager.float(), candidate.float()))
        budget = error_budget(reference, eager, candidate)
        if not masked_ok:
            return ErrorBudget(budget.eager_error, budget.candidate_error, budget.limit, False,
                               "masked keys do not hold the lowest value")
        return budget
    return error_budget(reference, eager, candidate)
