// The six GEMM operators of the layer as persistent stages, each with its optional fused epilogue
// (the elementwise or layout operator that follows it) and, for out_gemm, a merge-heads prologue.
#pragma once
#include <type_traits>

#include "fs_gemm.cuh"
#include "fs_gemm_resident.cuh"

namespace fs {

// Tile shapes of the layer GEMMs, by rows:
//  * up to kSkinnyMaxRows, 32×64 tiles with 128-deep K steps (24 KB a stage): the GEMM streams weights from
//    DRAM, so each block keeps three large stages in flight, and split-K stays within one wave of blocks with
//    few splits per tile (64×128×32 tiles made the last-arriving block of FFN2 at 32 rows read 24 partial tiles
//    of 32 KB, and FFN1 ran two waves);
//  * 64×128 tiles in between (more blocks in flight than 128-row tiles);
//  * 128×128 tiles with a 4-stage pipeline from kWideTileMinRows rows on (twice the reuse of each loaded tile).
// Q·Kᵀ uses 64×128 and P·V 64×head_size.
template <class T> using SkinnyTile = GemmTile<T, 32, 64, 2, false, 4, 128, true>;
template <class T> using LinearTile = GemmTile<T, 64, 128, 2, false>;
template <class T> using WideTile = GemmTile<T, 128, 128, 2, false, 4>;
constexpr int kSkinnyMaxRows = 128;
constexpr int kWideTileMinRows = 2048;
template <class T, class D> using PvTile = GemmTile<T, 64, D::d, (D::d == 32 ? 4 : 2), true>;

// ctx_heads [B, heads, S, d] read as the merged [M, H] matrix: merge_heads as a GEMM prologue.
template <class T, class D> struct HeadsAsRowsA {
  const T* base;
  int seq;
  __device__ __forceinline__ const T* chunk(int, int row, int k) const {
    const int b = row / seq, s = row - b * seq, h = k / D::d, j = k - h * D::d;
    return base + ((static_cast<long long>(b) * D::heads + h) * seq + s) * D::d + j;
  }
};

template <class T, class D, int OP> __host__ __device__ inline GemmShape gemm_shape(const LayerArgs& a) {
  const int M = a.batch * a.seq;
  if constexpr (OP == 0) return {M, 3 * D::hidden, D::hidden, 1};
  if constexpr (OP == 2) return {a.seq, a.seq, D::d, a.batch * D::heads};
  if constexpr (OP == 5) return {a.seq, D::d, a.seq, a.batch * D::heads};
  if constexpr (OP == 7) return {M, D::hidden, D::hidden, 1};
  if constexpr (OP == 10) return {M, D::ffn, D::hidden, 1};
  if constexpr (OP == 12) return {M, D::hidden, D::ffn, 1};
  return {0, 0, 0, 0};
}

template <class T, class D, int OP> using GemmTileOf =
    typename std::conditional<OP == 5, PvTile<T, D>, LinearTile<T>>::type;

__host__ __device__ constexpr bool is_attention_gemm(int op) { return op == 2 || op == 5; }
template <class T, class D, int OP> __host__ __device__ inline bool wide_tiles(const GemmShape& g) {
  return !is_attention_gemm(OP) && g.M >= kWideTileMinRows;
}
template <class T, class D, int OP> __host__ __device__ inline bool skinny_tiles(const GemmShape& g) {
  return !is_attention_gemm(OP) && g.M <= kSkinnyMaxRows;
}
template <class T, class D, int OP> __host__ __device__ inline int gemm_op_work(const LayerArgs& a) {
  const GemmShape g = gemm_shape<T, D, OP>(a);
  if (wide_tiles<T, D, OP>(g)) return WideTile<T>::work(g);
  if (skinny_tiles<T, D, OP>(g)) return SkinnyTile<T>::work(g);
  return GemmTileOf<T, D, OP>::work(g);
}
template <class T, class D, int OP> constexpr int gemm_op_smem() {
  return is_attention_gemm(OP) ? GemmTileOf<T, D, OP>::SMEM_BYTES
                               : max_of(max_of(LinearTile<T>::SMEM_BYTES, WideTile<T>::SMEM_BYTES),
                                        SkinnyTile<T>::SMEM_BYTES);
}

// Run the GEMM with the tile shape chosen for this problem size.
template <class T, class D, int OP, class ALoader, class Epi>
__device__ __forceinline__ void gemm_dispatch(const GemmShape& g, const ALoader& A, const MatB<T>& B, const Epi& epi,
                                              char* smem, const SplitK& sk) {
  if constexpr (is_attention_gemm(OP)) {
    gemm_run<GemmTileOf<T, D, OP>>(g, A, B, epi, smem, sk);
  } else {
    if (wide_tiles<T, D, OP>(g)) gemm_run<WideTile<T>>(g, A, B, epi, smem, sk);
    else if (skinny_tiles<T, D, OP>(g)) gemm_run<SkinnyTile<T>>(g, A, B, epi, smem, sk);
    else gemm_run<LinearTile<T>>(g, A, B, epi, smem, sk);
  }
}

// A layer GEMM (one with a weight matrix): against the block's resident weight slice where the segment kernel
// holds one, else tiled.
template <class T, class D, int OP, class Resident, bool SPLITS_TO_NEXT = false, class ALoader, class Epi>
__device__ __forceinline__ void layer_gemm(const GemmShape& g, const ALoader& A, const MatB<T>& B, const Epi& epi,
                                           char* smem, const SplitK& sk) {
  static_assert(!SPLITS_TO_NEXT || Resident::template holds<OP>(), "only a resident GEMM leaves its K splits");
  if constexpr (Resident::template holds<OP>()) resident_gemm<T, D, OP, Resident, SPLITS_TO_NEXT>(g, A, epi, smem, sk);
  else gemm_dispatch<T, D, OP>(g, A, B, epi, smem, sk);
}

// Ask L2 for a later stage's weight matrix at the start of a segment kernel, spread over the whole grid. At
// few rows the layer is bound by streaming 14 MB of weights, and the stages before a GEMM (its predecessors'
// GEMMs, attention, LayerNorm, grid barriers) would otherwise leave that stream idle.
template <class T, class D, int OP> __device__ __forceinline__ void prefetch_weights_l2(const LayerArgs& a) {
  using W = ResidentGemm<D, OP>;  // the weight's [N, K] shape
  constexpr long long kLine = 128;
  constexpr long long bytes = static_cast<long long>(W::N) * W::K * static_cast<long long>(sizeof(T));
  constexpr long long lines = (bytes + kLine - 1) / kLine;
  const char* base = static_cast<const char*>(OP == 0 ? a.w_qkv : OP == 7 ? a.w_o : OP == 10 ? a.w_ffn1 : a.w_ffn2);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < lines; i += stride)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(base + i * kLine));
}

// The epilogues of the layer GEMMs with weights, in two halves: `operands` reads the bias (and the residual) of an
// output pair, `store` finishes it. A resident GEMM reads the operands before its MMAs (EpilogueOperands); the tiled
// GEMM calls the whole epilogue at once.
template <class T, class D> struct QkvSplitEpilogue {  // QKV + bias, then split into [3, B, heads, S, d]
  using Pair = typename Elem<T>::Pair;
  struct Operands {
    Pair bias;
  };
  const T* bias;
  T* dst;
  int seq;
  long long heads_elems;  // one of Q, K, V in qkv_heads
  __device__ __forceinline__ Operands operands(int, int col) const {
    return {*reinterpret_cast<const Pair*>(bias + col)};
  }
  __device__ __forceinline__ void store(int row, int col, const Operands& o, float v0, float v1) const {
    const int which = col / D::hidden, h = (col % D::hidden) / D::d, j = col % D::d;
    const int b = row / seq, s = row % seq;
    T* p = dst + which * heads_elems + ((static_cast<long long>(b) * D::heads + h) * seq + s) * D::d + j;
    store2(p, v0 + to_f(o.bias.x), v1 + to_f(o.bias.y));
  }
  __device__ __forceinline__ void operator()(int, int row, int col, float v0, float v1) const {
    store(row, col, operands(row, col), v0, v1);
  }
};

// The three [M, N] linear layers: plain, + bias + GELU (FFN1), or + bias + residual (output GEMM, FFN2).
template <class T, int OP, int N, bool FUSE_NEXT> struct LinearEpilogue {
  using Pair = typename Elem<T>::Pair;
  struct Operands {
    Pair bias, residual;
  };
  const T* bias;
  const T* residual;
  T* plain;
  T* fused;
  __device__ __forceinline__ Operands operands(int row, int col) const {
    Operands o{};
    if constexpr (FUSE_NEXT) o.bias = *reinterpret_cast<const Pair*>(bias + col);
    if constexpr (FUSE_NEXT && OP != 10)
      o.residual = *reinterpret_cast<const Pair*>(residual + static_cast<long long>(row) * N + col);
    return o;
  }
  __device__ __forceinline__ void store(int row, int col, const Operands& o, float v0, float v1) const {
    const long long at = static_cast<long long>(row) * N + col;
    if constexpr (!FUSE_NEXT) store2(plain + at, v0, v1);
    else if constexpr (OP == 10) store2(fused + at, gelu_erf(v0 + to_f(o.bias.x)), gelu_erf(v1 + to_f(o.bias.y)));
    else store2(fused + at, v0 + to_f(o.bias.x) + to_f(o.residual.x), v1 + to_f(o.bias.y) + to_f(o.residual.y));
  }
  __device__ __forceinline__ void operator()(int, int row, int col, float v0, float v1) const {
    store(row, col, operands(row, col), v0, v1);
  }
};

// SPLITS_TO_NEXT (the output GEMM or FFN2 with resident weights): the K splits' sums stay in the split-K scratch
// for the LayerNorm after them (9 or 14), which adds them with the bias and residual.
template <class T, class D, int OP, bool FUSE_NEXT, bool MERGE_PROLOGUE, class Resident = NoResidentWeights,
          bool SPLITS_TO_NEXT = false>
__device__ void gemm_op(const LayerArgs& a, char* smem) {
  const GemmShape g = gemm_shape<T, D, OP>(a);
  const SplitK sk{a.splitk_partials, a.splitk_counters};
  const int S = a.seq;
  const long long M = static_cast<long long>(a.batch) * S;
  const long long heads_elems = M * D::hidden;  // one of Q, K, V in qkv_heads

  if constexpr (OP == 0) {
    const RowMajorA<T> A{static_cast<const T*>(a.x), D::hidden, 0};
    const MatB<T> B{static_cast<const T*>(a.w_qkv), D::hidden, 0};
    if constexpr (FUSE_NEXT) {
      const QkvSplitEpilogue<T, D> epilogue{static_cast<const T*>(a.b_qkv), static_cast<T*>(a.qkv_heads), S, heads_elems};
      layer_gemm<T, D, OP, Resident>(g, A, B, epilogue, smem, sk);
    } else {
      T* dst = static_cast<T*>(a.qkv);
      layer_gemm<T, D, OP, Resident>(g, A, B, [=](int, int row, int col, float v0, float v1) {
        store2(dst + static_cast<long long>(row) * 3 * D::hidden + col, v0, v1);
      }, smem, sk);
    }
  } else if constexpr (OP == 2) {
    const T* q = static_cast<const T*>(a.qkv_heads);
    const long long head_stride = static_cast<long long>(S) * D::d;
    const RowMajorA<T> A{q, D::d, head_stride};
    const MatB<T> B{q + heads_elems, D::d, head_stride};
    const long long score_stride = static_cast<long long>(S) * a.seq_pad;
    const int pad = a.seq_pad;
    if constexpr (FUSE_NEXT) {  // scale and additive key mask
      T* dst = static_cast<T*>(a.scores_masked);
      const float scale = a.scale;
      const float* kb = a.key_bias;
      gemm_dispatch<T, D, OP>(g, A, B, [=](int bh, int row, int col, float v0, float v1) {
        const int b = bh / D::heads;
        const float k0 = kb ? kb[b * S + col] : 0.f, k1 = kb ? kb[b * S + col + 1] : 0.f;
        T* p = dst + bh * score_stride + static_cast<long long>(row) * pad + col;
        p[0] = from_f_sat<T>(v0 * scale + k0);
        if (col + 1 < S) p[1] = from_f_sat<T>(v1 * scale + k1);
      }, smem, sk);
    } else {
      T* dst = static_cast<T*>(a.scores);
      gemm_dispatch<T, D, OP>(g, A, B, [=](int bh, int row, int col, float v0, float v1) {
        T* p = dst + bh * score_stride + static_cast<long long>(row) * pad + col;
        p[0] = from_f<T>(v0);
        if (col + 1 < S) p[1] = from_f<T>(v1);
      }, smem, sk);
    }
  } else if constexpr (OP == 5) {
    const long long score_stride = static_cast<long long>(S) * a.seq_pad;
    const long long head_stride = static_cast<long long>(S) * D::d;
    // Columns S..seq_pad-1 of probs are zero, so the A chunks that straddle S add nothing.
    const RowMajorA<T> A{static_cast<const T*>(a.probs), a.seq_pad, score_stride};
    const MatB<T> B{static_cast<const T*>(a.qkv_heads) + 2 * heads_elems, D::d, head_stride};
    if constexpr (FUSE_NEXT) {  // write merged heads [M, H] directly
      T* dst = static_cast<T*>(a.ctx);
      gemm_dispatch<T, D, OP>(g, A, B, [=](int bh, int row, int col, float v0, float v1) {
        const int b = bh / D::heads, h = bh % D::heads;
        store2(dst + (static_cast<long long>(b) * S + row) * D::hidden + h * D::d + col, v0, v1);
      }, smem, sk);
    } else {
      T* dst = static_cast<T*>(a.ctx_heads);
      gemm_dispatch<T, D, OP>(g, A, B, [=](int bh, int row, int col, float v0, float v1) {
        store2(dst + bh * head_stride + static_cast<long long>(row) * D::d + col, v0, v1);
      }, smem, sk);
    }
  } else {
    // The three [M, ·] linear layers share one shape of code.
    constexpr int N = OP == 10 ? D::ffn : D::hidden;
    constexpr int K = OP == 12 ? D::ffn : D::hidden;
    const T* w = static_cast<const T*>(OP == 7 ? a.w_o : OP == 10 ? a.w_ffn1 : a.w_ffn2);
    const MatB<T> B{w, K, 0};
    const LinearEpilogue<T, OP, N, FUSE_NEXT> epilogue{
        static_cast<const T*>(OP == 7 ? a.b_o : OP == 10 ? a.b_ffn1 : a.b_ffn2),
        static_cast<const T*>(OP == 7 ? a.x : a.attn_out),
        static_cast<T*>(OP == 7 ? a.attn_proj : OP == 10 ? a.ffn_pre : a.ffn_out),
        static_cast<T*>(OP == 7 ? a.attn_res : OP == 10 ? a.ffn_act : a.ffn_res)};
    static_assert(!SPLITS_TO_NEXT || (OP != 10 && !FUSE_NEXT), "a GEMM leaves its splits in place of its epilogue");
    if constexpr (OP == 7 && MERGE_PROLOGUE) {
      layer_gemm<T, D, OP, Resident, SPLITS_TO_NEXT>(g, HeadsAsRowsA<T, D>{static_cast<const T*>(a.ctx_heads), S}, B,
                                                     epilogue, smem, sk);
    } else {
      const T* src = static_cast<const T*>(OP == 7 ? a.ctx : OP == 10 ? a.attn_out : a.ffn_act);
      layer_gemm<T, D, OP, Resident, SPLITS_TO_NEXT>(g, RowMajorA<T>{src, K, 0}, B, epilogue, smem, sk);
    }
  }
}

}  // namespace fs
