"""Memory layout shared by codegen and runtime: the binding's tensor order and the intermediate buffer shapes."""
from __future__ import annotations

from .config import LayerConfig
from .ops import tensor_shape

# Parameters and inputs, in the order the binding receives them; then every operator output.
INPUT_TENSORS = ("key_bias", "x", "w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b",
                 "w_ffn1", "b_ffn1", "w_ffn2", "b_ffn2", "ln2_w", "ln2_b")
OUTPUT_TENSORS = ("qkv", "qkv_heads", "scores", "scores_masked", "probs", "ctx_heads", "ctx", "attn_proj",
                  "attn_res", "attn_out", "ffn_pre", "ffn_act", "ffn_out", "ffn_res", "out")
# Scratch that generated GEMMs use for split-K (see kernels/fs_gemm.cuh); allocated once per layer.
WORKSPACE_TENSORS = ("splitk_partials", "splitk_counters")
LAYER_TENSORS = INPUT_TENSORS + OUTPUT_TENSORS + WORKSPACE_TENSORS
SPLITK_PARTIAL_FLOATS = 512 * 64 * 128  # kSplitKMaxWork × the 64×128 tile
SPLITK_COUNTERS = 512 + 32  # one per split-K tile, then the grid barrier's (kGridBarrierWord in kernels/fs_args.h)


def splitk_workspace(device) -> dict:
    """Split-K scratch: fp32 partial tiles and zeroed arrival counters (the kernels keep them zeroed)."""
    import torch
    return {"splitk_partials": torch.empty(SPLITK_PARTIAL_FLOATS, device=device, dtype=torch.float32),
            "splitk_counters": torch.zeros(SPLITK_COUNTERS, device=device, dtype=torch.int32)}
SCORE_TENSORS = ("scores", "scores_masked", "probs")


def workspace_shape(name: str, cfg: LayerConfig) -> tuple[int, ...]:
    """Buffer shape of an operator output; S×S buffers have rows padded to a multiple of 8 (16-byte rows)."""
    shape = tensor_shape(name, cfg)
    if name in SCORE_TENSORS:
        return (*shape[:-1], (cfg.seq_len + 7) // 8 * 8)
    return shape
