// Arguments shared by every segment kernel of one layer; plain pointers so the torch binding can fill them
// without CUDA types. Buffers follow fusionsearch/ops.py: each operator writes its own output tensor.
#pragma once

namespace fs {

struct LayerArgs {
  int batch;       // B
  int seq;         // S
  int seq_pad;     // row stride of the S×S score buffers: S rounded up to 8 (16-byte rows)
  float eps;       // LayerNorm epsilon
  float scale;     // 1/sqrt(head_size)
  const float* key_bias;  // [B, S] additive key mask (0 or the lowest float), or nullptr for none
  // Inputs and parameters (nn.Linear layout [out, in]).
  const void* x;
  const void* w_qkv; const void* b_qkv;
  const void* w_o;   const void* b_o;
  const void* ln1_w; const void* ln1_b;
  const void* w_ffn1; const void* b_ffn1;
  const void* w_ffn2; const void* b_ffn2;
  const void* ln2_w; const void* ln2_b;
  // Operator outputs (nullptr where the plan never materialises them).
  void* qkv;            // op 0  [M, 3H]
  void* qkv_heads;      // op 1  [3, B, heads, S, d]
  void* scores;         // op 2  [B, heads, S, seq_pad]
  void* scores_masked;  // op 3  [B, heads, S, seq_pad]
  void* probs;          // op 4  [B, heads, S, seq_pad], columns S..seq_pad-1 are zero
  void* ctx_heads;      // op 5  [B, heads, S, d]
  void* ctx;            // op 6  [M, H]
  void* attn_proj;      // op 7  [M, H]
  void* attn_res;       // op 8  [M, H]
  void* attn_out;       // op 9  [M, H]
  void* ffn_pre;        // op 10 [M, FF]
  void* ffn_act;        // op 11 [M, FF]
  void* ffn_out;        // op 12 [M, H]
  void* ffn_res;        // op 13 [M, H]
  void* out;            // op 14 [M, H]
  // Split-K scratch for GEMMs with few rows: fp32 partial tiles and one arrival counter per output tile
  // (counters start at zero and the last arriving block resets its counter); word kGridBarrierWord is the grid
  // barrier's counter.
  float* splitk_partials;
  unsigned int* splitk_counters;
};

// The grid barrier's counter in splitk_counters: past the split-K tiles' counters (kSplitKMaxWork), on a 128-byte
// line of its own; the buffer holds kSplitKCounterWords words (fusionsearch/layout.py allocates them).
constexpr int kGridBarrierWord = 512;
constexpr int kSplitKCounterWords = kGridBarrierWord + 32;

}  // namespace fs
