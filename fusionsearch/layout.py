"""Memory layout shared by codegen and runtime: the binding's tensor order and the intermediate buffer shapes."""
from __future__ import annotations

from .config import LayerConfig
from .ops import tensor_shape

# Parameters and inputs, in the order the binding receives them; then every operator output.
INPUT_TENSORS = ("key_bias", "x", "w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b",
                 "w_ffn1", "b_ffn1", "w_ffn2", "b_ffn2", "ln2_w", "ln2_b")
OUTPUT_TENSORS = ("qkv", "qkv_heads", "scores", "scores_masked", "probs", "ctx_heads", "ctx", "attn_proj",
                  "attn_res", "attn_out", "ffn_pre", "ffn_act", "ffn_out", "ffn_res", "out")
LAYER_TENSORS = INPUT_TENSORS + OUTPUT_TENSORS
SCORE_TENSORS = ("scores", "scores_masked", "probs")


def workspace_shape(name: str, cfg: LayerConfig) -> tuple[int, ...]:
    """Buffer shape of an operator output; S×S buffers have rows padded to a multiple of 8 (16-byte rows)."""
    shape = tensor_shape(name, cfg)
    if name in SCORE_TENSORS:
        return (*shape[:-1], (cfg.seq_len + 7) // 8 * 8)
    return shape
