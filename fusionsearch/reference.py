"""The layer in PyTorch as the 15 operators of ops.OPS: the numerics every plan is checked against."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .config import LayerConfig
from .errors import ConfigError, FusionSearchError, PlanError
from .ops import NUM_OPS, OPS
from .weights import TENSOR_NAMES, LayerWeights

Env = dict  # tensor name (ops.OPS inputs/outputs) → tensor; 'attention_mask' may be None


def additive_key_mask(attention_mask: "torch.Tensor | None", dtype: torch.dtype) -> "torch.Tensor | None":
    """HF mask [B, S] (1/True = attend, 0/False = padding) → additive [B, 1, 1, S]; None when there is no mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}; it must be [batch, seq_len] "
                          f"with 1 = attend and 0 = padding, as Hugging Face tokenizers return it")
    keep = attention_mask.to(dtype)
    # The finite minimum, not -inf: a fully masked row then gives a uniform softmax, as in HF, never NaN.
    return ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]


def qkv_gemm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """QKV = X·Wqkvᵀ, [M, 3H] (bias comes in the next operator)."""
    return F.linear(env["x"], w.w_qkv)


def qkv_bias_split(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """Add the QKV bias and split into heads: [3, B, heads, S, d]."""
    qkv = env["qkv"] + w.b_qkv
    # Columns of QKV are (q|k|v) × heads × d, so the view below is exactly nn.MultiheadAttention's split.
    return qkv.view(cfg.batch, cfg.seq_len, 3, cfg.heads, cfg.head_size).permute(2, 0, 3, 1, 4).contiguous()


def qk_gemm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """Scores = Q·Kᵀ, [B, heads, S, S]."""
    q, k = env["qkv_heads"][0], env["qkv_heads"][1]
    return torch.matmul(q, k.transpose(-1, -2))


def scale_mask(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """Scores · 1/√d plus the additive key mask."""
    scores = env["scores"] * (1.0 / math.sqrt(cfg.head_size))
    mask = env["attention_mask"]
    if mask is None:
        return scores
    if tuple(mask.shape) != (cfg.batch, cfg.seq_len):
        raise ConfigError(f"attention_mask has shape {list(mask.shape)} but the layer runs batch {cfg.batch} × "
                          f"seq_len {cfg.seq_len}; pass a [{cfg.batch}, {cfg.seq_len}] mask")
    masked = scores + additive_key_mask(mask.to(scores.device), scores.dtype)
    # In fp16, score + finfo.min can round to -inf; a fully masked row of -inf would softmax to NaN.
    return masked.clamp_min(torch.finfo(scores.dtype).min)


def softmax(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """P = softmax over keys."""
    return torch.softmax(env["scores_masked"], dim=-1)


def pv_gemm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """O = P·V, [B, heads, S, d]."""
    return torch.matmul(env["probs"], env["qkv_heads"][2])


def merge_heads(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """[B, heads, S, d] → [M, H]."""
    return env["ctx_heads"].transpose(1, 2).reshape(cfg.tokens, cfg.hidden)


def out_gemm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """A = C·Woᵀ."""
    return F.linear(env["ctx"], w.w_o)


def attn_bias_residual(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """A + bo + X."""
    return env["attn_proj"] + w.b_o + env["x"]


def attn_layernorm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """LN(A; γ1, β1)."""
    return F.layer_norm(env["attn_res"], (cfg.hidden,), w.ln1_w, w.ln1_b, cfg.eps)


def ffn1_gemm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """F = A·W1ᵀ, [M, FF]."""
    return F.linear(env["attn_out"], w.w_ffn1)


def bias_gelu(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """GELU_erf(F + b1)."""
    return F.gelu(env["ffn_pre"] + w.b_ffn1)


def ffn2_gemm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """Y = F·W2ᵀ, [M, H]."""
    return F.linear(env["ffn_act"], w.w_ffn2)


def ffn_bias_residual(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """Y + b2 + A."""
    return env["ffn_out"] + w.b_ffn2 + env["attn_out"]


def out_layernorm(env: Env, w: LayerWeights, cfg: LayerConfig) -> torch.Tensor:
    """out = LN(Y; γ2, β2)."""
    return F.layer_norm(env["ffn_res"], (cfg.hidden,), w.ln2_w, w.ln2_b, cfg.eps)


OP_FUNCTIONS = (qkv_gemm, qkv_bias_split, qk_gemm, scale_mask, softmax, pv_gemm, merge_heads, out_gemm,
                attn_bias_residual, attn_layernorm, ffn1_gemm, bias_gelu, ffn2_gemm, ffn_bias_residual, out_layernorm)


def run_ops(first: int, last: int, env: Env, w: LayerWeights, cfg: LayerConfig) -> Env:
    """Run operators first…last on a copy of `env`, storing each output under OPS[i].output."""
    if not 0 <= first <= last < NUM_OPS:
        raise PlanError(f"operators {first}…{last} are outside 0…{NUM_OPS - 1}; give 0 ≤ first ≤ last ≤ {NUM_OPS - 1}")
    env = dict(env)
    for op in OPS[first:last + 1]:
        for name in op.inputs:
            if name not in TENSOR_NAMES and name not in env:
                raise PlanError(f"operator {op.index} ({op.name}) needs {name!r}, which env lacks; run from an "
                                f"earlier operator or add it to env (attention_mask=None means no padding)")
        env[op.output] = OP_FUNCTIONS[op.index](env, w, cfg)
    return env


def _as_tokens(x: torch.Tensor, cfg: LayerConfig) -> torch.Tensor:
    if tuple(x.shape) == (cfg.batch, cfg.seq_len, cfg.hidden):
        return x.reshape(cfg.tokens, cfg.hidden)
    if tuple(x.shape) == (cfg.tokens, cfg.hidden):
        return x
    raise ConfigError(f"x has shape {list(x.shape)} but the config needs [{cfg.batch}, {cfg.seq_len}, {cfg.hidden}] "
                      f"or [{cfg.tokens}, {cfg.hidden}]; build the config with cfg.with_shape(batch, seq_len)")


def reference_layer(x: torch.Tensor, attention_mask: "torch.Tensor | None", w: LayerWeights, cfg: LayerConfig,
                    compute_dtype: "torch.dtype | None" = None) -> Env:
    """Run all 15 operators in `compute_dtype` (default: x's dtype); return every intermediate ('out' is [M, H])."""
    w.check(cfg)
    dtype = x.dtype if compute_dtype is None else compute_dtype
    env: Env = {
        "x": _as_tokens(x, cfg).to(dtype),
        "attention_mask": None if attention_mask is None else attention_mask.to(x.device),
    }
    return run_ops(0, NUM_OPS - 1, env, w.to(device=x.device, dtype=dtype), cfg)


def reference_forward(x: torch.Tensor, attention_mask: "torch.Tensor | None", w: LayerWeights, cfg: LayerConfig,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's output [B, S, H] computed in `compute_dtype` (fp32 by default: the reference)."""
    out = reference_layer(x, attention_mask, w, cfg, compute_dtype)["out"]
    return out.view(cfg.batch, cfg.seq_len, cfg.hidden)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖ / ‖reference‖ in float64 (absolute norm if the reference is zero); NaN stays NaN."""
    if tuple(value.shape) != tuple(reference.shape):
        raise FusionSearchError(f"cannot compare shape {list(value.shape)} with the reference's "
                                f"{list(reference.shape)}; reshape the output to the reference's layout first")
    ref = reference.detach().to(torch.float64)
    diff = torch.linalg.vector_norm(value.detach().to(device=ref.device, dtype=torch.float64) - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


@dataclass(frozen=True)
class ErrorBudget:
    """Errors of PyTorch's own low-precision output and of a candidate against the fp32 reference."""

    eager_error: float
    candidate_error: float
    limit: float
    ok: bool
    reason: str

    def to_dict(self) -> dict:
        """The verdict as JSON-ready fields (for records)."""
        return asdict(self)


def error_budget(reference: torch.Tensor, eager: torch.Tensor, candidate: torch.Tensor,
                 factor: float = 2.0, floor: float = 1e-5) -> ErrorBudget:
    """Pass if the candidate's relative error ≤ factor × max(PyTorch's own error, floor); NaN never passes."""
    # The floor keeps an fp32 candidate (PyTorch's fp32 error is 0) from failing on summation-order noise
    # (~1e-7); it is far below fp16/bf16 rounding (~1e-3), so it never loosens a low-precision check.
    eager_error = relative_error(eager, reference)
    candidate_error = relative_error(candidate, reference)
    if not bool(torch.isfinite(reference).all()):
        return ErrorBudget(eager_error, candidate_error, math.nan, False, "the reference is not finite")
    if not math.isfinite(eager_error):
        return ErrorBudget(eager_error, candidate_error, math.nan, False,
                           "PyTorch's own low-precision output is not finite, so there is no budget")
    limit = factor * max(eager_error, floor)
    if not math.isfinite(candidate_error):
        return ErrorBudget(eager_error, candidate_error, limit, False, "the candidate holds NaN or inf")
    ok = candidate_error <= limit
    verdict = "within" if ok else "over"
    return ErrorBudget(eager_error, candidate_error, limit, ok,
                       f"candidate error {candidate_error:.3g} is {verdict} the limit {limit:.3g} "
                       f"({factor:g} × max(PyTorch's {eager_error:.3g}, floor {floor:g}))")
