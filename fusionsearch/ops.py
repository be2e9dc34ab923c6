"""The 15 operators of a post-LayerNorm BERT layer as data: shapes, FLOPs and minimum bytes per config."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .config import LayerConfig


class OpKind(str, Enum):
    GEMM = "gemm"
    BATCHED_GEMM = "batched_gemm"
    ELEMENTWISE = "elementwise"
    LAYOUT = "layout"
    ROW_REDUCTION = "row_reduction"


@dataclass(frozen=True)
class Operator:
    """One operator; `inputs` and `output` name tensors whose shapes `tensor_shape` gives."""

    index: int
    name: str
    kind: OpKind
    inputs: tuple[str, ...]
    output: str
    computes: str

    @property
    def position(self) -> int:
        """Bit position of this operator in the 16-bit mask (pos0 is the attention flag)."""
        return self.index + 1

    @property
    def is_gemm(self) -> bool:
        return self.kind in (OpKind.GEMM, OpKind.BATCHED_GEMM)

    def flops(self, cfg: LayerConfig) -> int:
        return _FLOPS[self.index](cfg)

    def min_bytes(self, cfg: LayerConfig) -> int:
        """Bytes moved if every input is read once and the output written once."""
        return sum(tensor_bytes(name, cfg) for name in (*self.inputs, self.output))


OPS: tuple[Operator, ...] = (
    Operator(0, "qkv_gemm", OpKind.GEMM, ("x", "w_qkv"), "qkv", "QKV = X·Wqkvᵀ"),
    Operator(1, "qkv_bias_split", OpKind.ELEMENTWISE, ("qkv", "b_qkv"), "qkv_heads", "Q, K, V = split_heads(QKV + b)"),
    Operator(2, "qk_gemm", OpKind.BATCHED_GEMM, ("qkv_heads",), "scores", "Sc = Q·Kᵀ"),
    Operator(3, "scale_mask", OpKind.ELEMENTWISE, ("scores", "attention_mask"), "scores_masked", "Sc/√d + key mask"),
    Operator(4, "softmax", OpKind.ROW_REDUCTION, ("scores_masked",), "probs", "P = softmax(Sc)"),
    Operator(5, "pv_gemm", OpKind.BATCHED_GEMM, ("probs", "qkv_heads"), "ctx_heads", "O = P·V"),
    Operator(6, "merge_heads", OpKind.LAYOUT, ("ctx_heads",), "ctx", "C = merge_heads(O)"),
    Operator(7, "out_gemm", OpKind.GEMM, ("ctx", "w_o"), "attn_proj", "A = C·Woᵀ"),
    Operator(8, "bias_residual", OpKind.ELEMENTWISE, ("attn_proj", "b_o", "x"), "attn_res", "A = A + bo + X"),
    Operator(9, "layernorm", OpKind.ROW_REDUCTION, ("attn_res", "ln1_w", "ln1_b"), "attn_out", "A = LN(A)"),
    Operator(10, "ffn1_gemm", OpKind.GEMM, ("attn_out", "w_ffn1"), "ffn_pre", "F = A·W1ᵀ"),
    Operator(11, "bias_gelu", OpKind.ELEMENTWISE, ("ffn_pre", "b_ffn1"), "ffn_act", "F = GELU_erf(F + b1)"),
    Operator(12, "ffn2_gemm", OpKind.GEMM, ("ffn_act", "w_ffn2"), "ffn_out", "Y = F·W2ᵀ"),
    Operator(13, "bias_residual", OpKind.ELEMENTWISE, ("ffn_out", "b_ffn2", "attn_out"), "ffn_res", "Y = Y + b2 + A"),
    Operator(14, "layernorm", OpKind.ROW_REDUCTION, ("ffn_res", "ln2_w", "ln2_b"), "out", "out = LN(Y)"),
)
NUM_OPS = len(OPS)
ATTENTION_OPS = (2, 5)  # first and last operator that the hand-written attention kernel runs


def tensor_shape(name: str, cfg: LayerConfig) -> tuple[int, ...]:
    """Shape of a named tensor of the layer (weights in nn.Linear's [out, in] layout)."""
    b, s, h, d, hid, ff, m = cfg.batch, cfg.seq_len, cfg.heads, cfg.head_size, cfg.hidden, cfg.ffn, cfg.tokens
    shapes = {
        "x": (m, hid), "attention_mask": (b, s),
        "w_qkv": (3 * hid, hid), "b_qkv": (3 * hid,), "qkv": (m, 3 * hid), "qkv_heads": (3, b, h, s, d),
        "scores": (b, h, s, s), "scores_masked": (b, h, s, s), "probs": (b, h, s, s),
        "ctx_heads": (b, h, s, d), "ctx": (m, hid),
        "w_o": (hid, hid), "b_o": (hid,), "attn_proj": (m, hid), "attn_res": (m, hid),
        "ln1_w": (hid,), "ln1_b": (hid,), "attn_out": (m, hid),
        "w_ffn1": (ff, hid), "b_ffn1": (ff,), "ffn_pre": (m, ff), "ffn_act": (m, ff),
        "w_ffn2": (hid, ff), "b_ffn2": (hid,), "ffn_out": (m, hid), "ffn_res": (m, hid),
        "ln2_w": (hid,), "ln2_b": (hid,), "out": (m, hid),
    }
    if name not in shapes:
        raise KeyError(f"unknown tensor {name!r}; known: {', '.join(shapes)}")
    return shapes[name]


def tensor_bytes(name: str, cfg: LayerConfig) -> int:
    count = 1
    for extent in tensor_shape(name, cfg):
        count *= extent
    # The attention mask arrives as one byte per key; everything else is in the layer's dtype.
    return count * (1 if name == "attention_mask" else cfg.element_bytes)


def _gemm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


_FLOPS = (
    lambda c: _gemm(c.tokens, 3 * c.hidden, c.hidden),
    lambda c: 3 * c.tokens * c.hidden,
    lambda c: c.batch * c.heads * _gemm(c.seq_len, c.seq_len, c.head_size),
    lambda c: 2 * c.batch * c.heads * c.seq_len ** 2,
    lambda c: 5 * c.batch * c.heads * c.seq_len ** 2,
    lambda c: c.batch * c.heads * _gemm(c.seq_len, c.head_size, c.seq_len),
    lambda c: 0,
    lambda c: _gemm(c.tokens, c.hidden, c.hidden),
    lambda c: 2 * c.tokens * c.hidden,
    lambda c: 8 * c.tokens * c.hidden,
    lambda c: _gemm(c.tokens, c.ffn, c.hidden),
    lambda c: 10 * c.tokens * c.ffn,
    lambda c: _gemm(c.tokens, c.hidden, c.ffn),
    lambda c: 2 * c.tokens * c.hidden,
    lambda c: 8 * c.tokens * c.hidden,
)


def layer_flops(cfg: LayerConfig) -> int:
    return sum(op.flops(cfg) for op in OPS)


def layer_min_bytes(cfg: LayerConfig, fused_attention: bool = True) -> int:
    """The fewest bytes a whole layer must move: input, weights, output (and S×S scores if not fused)."""
    names = ["x", "attention_mask", "out", "w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b",
             "w_ffn1", "b_ffn1", "w_ffn2", "b_ffn2", "ln2_w", "ln2_b"]
    return sum(tensor_bytes(n, cfg) for n in names) + (0 if fused_attention else 2 * tensor_bytes("probs", cfg))


def roofline_floor_us(cfg: LayerConfig, peak_tflops: float, bandwidth_tbs: float) -> float:
    """max(FLOPs / peak, minimum bytes / bandwidth) in microseconds, from measured ceilings."""
    return max(layer_flops(cfg) / (peak_tflops * 1e12), layer_min_bytes(cfg) / (bandwidth_tbs * 1e12)) * 1e6
