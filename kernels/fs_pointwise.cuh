// Elementwise, layout and row-reduction operators as grid-strided stages. Row reductions (softmax,
// LayerNorm) give each row to one warp and absorb the elementwise operator before them when fused.
#pragma once
#include "fs_common.cuh"

namespace fs {

// ---------------- elementwise and layout operators (1, 3, 6, 8, 11, 13) ----------------

template <class T, class D, int OP> __host__ __device__ inline long long elementwise_chunks(const LayerArgs& a) {
  const long long M = static_cast<long long>(a.batch) * a.seq;
  if constexpr (OP == 1) return M * 3 * D::hidden / 8;
  if constexpr (OP == 3) return static_cast<long long>(a.batch) * D::heads * a.seq * (a.seq_pad / 8);
  if constexpr (OP == 11) return M * D::ffn / 8;
  return M * D::hidden / 8;
}

template <class T, class D, int OP> __host__ __device__ inline int elementwise_work(const LayerArgs& a) {
  const long long blocks = (elementwise_chunks<T, D, OP>(a) + kThreads - 1) / kThreads;
  return blocks > (1 << 30) ? (1 << 30) : static_cast<int>(blocks);
}

template <class T, class D, int OP> __device__ void elementwise_op(const LayerArgs& a) {
  const long long total = elementwise_chunks<T, D, OP>(a);
  const int S = a.seq;
  const long long M = static_cast<long long>(a.batch) * S;
  for (long long c = blockIdx.x * static_cast<long long>(kThreads) + threadIdx.x; c < total;
       c += static_cast<long long>(gridDim.x) * kThreads) {
    float v[8];
    if constexpr (OP == 1) {  // QKV + bias → [3, B, heads, S, d]
      const long long m = c / (3 * D::hidden / 8);
      const int col = static_cast<int>(c % (3 * D::hidden / 8)) * 8;
      load8(static_cast<const T*>(a.qkv) + m * 3 * D::hidden + col, v);
      float bias[8];
      load8(static_cast<const T*>(a.b_qkv) + col, bias);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += bias[i];
      const int which = col / D::hidden, h = (col % D::hidden) / D::d, j = col % D::d;
      const long long b = m / S, s = m % S;
      store8(static_cast<T*>(a.qkv_heads) + which * M * D::hidden + ((b * D::heads + h) * S + s) * D::d + j, v);
    } else if constexpr (OP == 3) {  // scale and key mask; padding columns get the lowest value
      const long long row = c / (a.seq_pad / 8);
      const int col = static_cast<int>(c % (a.seq_pad / 8)) * 8;
      const long long at = row * a.seq_pad + col;
      const int b = static_cast<int>(row / (static_cast<long long>(D::heads) * S));
      load8(static_cast<const T*>(a.scores) + at, v);
      Vec8<T> out;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int k = col + i;
        const float kb = (a.key_bias && k < S) ? a.key_bias[b * S + k] : 0.f;
        out.v[i] = from_f_sat<T>(k < S ? v[i] * a.scale + kb : -FLT_MAX);
      }
      *reinterpret_cast<Vec8<T>*>(static_cast<T*>(a.scores_masked) + at) = out;
    } else if constexpr (OP == 6) {  // [B, heads, S, d] → [M, H]
      const long long m = c / (D::hidden / 8);
      const int col = static_cast<int>(c % (D::hidden / 8)) * 8;
      const int h = col / D::d, j = col % D::d;
      const long long b = m / S, s = m % S;
      load8(static_cast<const T*>(a.ctx_heads) + ((b * D::heads + h) * S + s) * D::d + j, v);
      store8(static_cast<T*>(a.ctx) + m * D::hidden + col, v);
    } else if constexpr (OP == 11) {  // GELU(F + b1)
      const long long at = c * 8;
      const int col = static_cast<int>(at % D::ffn);
      float bias[8];
      load8(static_cast<const T*>(a.ffn_pre) + at, v);
      load8(static_cast<const T*>(a.b_ffn1) + col, bias);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = gelu_erf(v[i] + bias[i]);
      store8(static_cast<T*>(a.ffn_act) + at, v);
    } else {  // OP 8 / 13: y + bias + residual
      const long long at = c * 8;
      const int col = static_cast<int>(at % D::hidden);
      float bias[8], res[8];
      load8(static_cast<const T*>(OP == 8 ? a.attn_proj : a.ffn_out) + at, v);
      load8(static_cast<const T*>(OP == 8 ? a.b_o : a.b_ffn2) + col, bias);
      load8(static_cast<const T*>(OP == 8 ? a.x : a.attn_out) + at, res);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += bias[i] + res[i];
      store8(static_cast<T*>(OP == 8 ? a.attn_res : a.ffn_res) + at, v);
    }
  }
}

// ---------------- row reductions (4 softmax, 9 and 14 LayerNorm) ----------------

template <class T, class D, int OP> __host__ __device__ inline int rowwise_work(const LayerArgs& a) {
  const long long rows = OP == 4 ? static_cast<long long>(a.batch) * D::heads * a.seq
                                 : static_cast<long long>(a.batch) * a.seq;
  const long long blocks = (rows + kWarps - 1) / kWarps;
  return blocks > (1 << 30) ? (1 << 30) : static_cast<int>(blocks);
}

template <class T, class D, bool ABSORB_SCALE_MASK> __device__ void softmax_rows(const LayerArgs& a) {
  const int S = a.seq, pad = a.seq_pad, chunks = pad / 8;
  const long long rows = static_cast<long long>(a.batch) * D::heads * S;
  const int lane = threadIdx.x % 32;
  const T* src = static_cast<const T*>(ABSORB_SCALE_MASK ? a.scores : a.scores_masked);
  T* dst = static_cast<T*>(a.probs);
  for (long long row = blockIdx.x * static_cast<long long>(kWarps) + threadIdx.x / 32; row < rows;
       row += static_cast<long long>(gridDim.x) * kWarps) {
    const int b = static_cast<int>(row / (static_cast<long long>(D::heads) * S));
    const T* in = src + row * pad;
    auto value = [&](float raw, int k) {
      if (k >= S) return -INFINITY;  // padding columns take no probability
      if constexpr (ABSORB_SCALE_MASK) return raw * a.scale + (a.key_bias ? a.key_bias[b * S + k] : 0.f);
      return raw;
    };
    // Pass 1: an online max and sum per lane, then across the warp. Lowest finite start keeps a fully
    // masked row uniform instead of NaN.
    float mx = -FLT_MAX, sum = 0.f;
    for (int c = lane; c < chunks; c += 32) {
      float v[8];
      load8(in + c * 8, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float t = value(v[i], c * 8 + i);
        if (t > mx) { sum *= __expf(mx - t); mx = t; }
        sum += __expf(t - mx);
      }
    }
    const float row_max = warp_max(mx);
    const float row_sum = warp_sum(sum * __expf(mx - row_max));
    const float inv = 1.f / row_sum;
    for (int c = lane; c < chunks; c += 32) {
      float v[8];
      load8(in + c * 8, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __expf(value(v[i], c * 8 + i) - row_max) * inv;
      store8(dst + row * pad + c * 8, v);
    }
  }
}

// One row per warp. Each lane sums its values of the row and their squared deviations from its own mean; the
// lanes' (mean, M2) pairs then pool in one shuffle tree by the parallel-variance rule (M2 = M2_a + M2_b +
// δ²·n_a·n_b/(n_a + n_b)), instead of a tree for the mean and a second one for the squares after it.
// SPLITS > 0 (LayerNorm 9 or 14 after a resident output GEMM or FFN2 that left its K splits): the GEMM's output is
// the sum of SPLITS fp32 partials in the split-K scratch ([split][M][hidden]), added in split order.
template <class T, class D, int OP, bool ABSORB_BIAS_RESIDUAL, int SPLITS = 0>
__device__ void layernorm_rows(const LayerArgs& a) {
  static_assert(SPLITS == 0 || ABSORB_BIAS_RESIDUAL, "the LayerNorm that adds a GEMM's splits adds its bias too");
  constexpr int CHUNKS = D::hidden / 8, PER_LANE = (CHUNKS + 31) / 32;
  constexpr bool kEven = CHUNKS % 32 == 0;  // every lane holds PER_LANE chunks (every BERT width)
  const long long rows = static_cast<long long>(a.batch) * a.seq;
  const int lane = threadIdx.x % 32;
  // OP 9 normalises attn_res = attn_proj + b_o + x; OP 14 normalises ffn_res = ffn_out + b_ffn2 + attn_out.
  const T* summed = static_cast<const T*>(OP == 9 ? a.attn_res : a.ffn_res);
  const T* proj = static_cast<const T*>(OP == 9 ? a.attn_proj : a.ffn_out);
  const T* bias = static_cast<const T*>(OP == 9 ? a.b_o : a.b_ffn2);
  const T* residual = static_cast<const T*>(OP == 9 ? a.x : a.attn_out);
  const T* gamma = static_cast<const T*>(OP == 9 ? a.ln1_w : a.ln2_w);
  const T* beta = static_cast<const T*>(OP == 9 ? a.ln1_b : a.ln2_b);
  T* dst = static_cast<T*>(OP == 9 ? a.attn_out : a.out);
  const float n_lane = 8.f * (kEven ? PER_LANE : (CHUNKS - lane + 31) / 32);
  // Fewer rows than the grid has warps (a stage of a persistent kernel at a few dozen rows): the rows go to the
  // blocks first, so each SM reads one row's operands instead of eight and the pass takes as many SMs as it can.
  // Otherwise each block takes kWarps consecutive rows a pass.
  const long long grid_warps = static_cast<long long>(gridDim.x) * kWarps;
  const int warp = threadIdx.x / 32;
  const long long first = rows < grid_warps ? static_cast<long long>(warp) * gridDim.x + blockIdx.x
                                            : static_cast<long long>(blockIdx.x) * kWarps + warp;
  for (long long row = first; row < rows; row += grid_warps) {
    float v[PER_LANE][8];
    float sum = 0.f;
    Vec8<T> gamma8[PER_LANE], beta8[PER_LANE];  // loaded with the row, so no load waits after its reduction
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) {
      const int c = lane + p * 32;
      if (!kEven && c >= CHUNKS) continue;
      const long long at = row * D::hidden + c * 8;
      gamma8[p] = *reinterpret_cast<const Vec8<T>*>(gamma + c * 8);
      beta8[p] = *reinterpret_cast<const Vec8<T>*>(beta + c * 8);
      if constexpr (SPLITS > 0) {
        float4 part[SPLITS][2];
#pragma unroll
        for (int k = 0; k < SPLITS; ++k) {
          const float4* from = reinterpret_cast<const float4*>(a.splitk_partials + k * rows * D::hidden + at);
          part[k][0] = __ldcg(from);
          part[k][1] = __ldcg(from + 1);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          v[p][i] = 0.f;
#pragma unroll
          for (int k = 0; k < SPLITS; ++k) v[p][i] += reinterpret_cast<const float*>(part[k])[i];
        }
      } else if constexpr (ABSORB_BIAS_RESIDUAL) {
        load8(proj + at, v[p]);
      } else {
        load8(summed + at, v[p]);
      }
      if constexpr (ABSORB_BIAS_RESIDUAL) {  // in fp32 onto the GEMM's output, as its epilogue would add them
        float bb[8], rr[8];
        load8(bias + c * 8, bb);
        load8(residual + at, rr);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[p][i] += bb[i] + rr[i];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += v[p][i];
    }
    const float lane_mean = n_lane > 0.f ? sum / n_lane : 0.f;
    float m2 = 0.f;
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) {
      if (!kEven && lane + p * 32 >= CHUNKS) continue;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[p][i] -= lane_mean;  // kept as deviations: the normalisation below starts from them
        m2 += v[p][i] * v[p][i];
      }
    }
    float mean = lane_mean, n = n_lane;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float other_mean = __shfl_xor_sync(0xffffffffu, mean, o);
      const float other_m2 = __shfl_xor_sync(0xffffffffu, m2, o);
      const float delta = other_mean - mean;
      if constexpr (kEven) {  // equal counts: M2 gains δ²·n/2, the mean is the midpoint
        m2 = __fadd_rn(__fadd_rn(m2, other_m2), __fmul_rn(__fmul_rn(delta, delta), 0.5f * n));
        mean = __fmul_rn(__fadd_rn(mean, other_mean), 0.5f);
        n *= 2.f;
      } else {  // written symmetrically (no contraction), so both lanes of a pair keep the same bits
        const float other_n = __shfl_xor_sync(0xffffffffu, n, o), total = n + other_n;
        const float inv = total > 0.f ? 1.f / total : 0.f;
        m2 = __fadd_rn(__fadd_rn(m2, other_m2), __fmul_rn(__fmul_rn(delta, delta), __fmul_rn(__fmul_rn(n, other_n), inv)));
        mean = __fmul_rn(__fadd_rn(__fmul_rn(mean, n), __fmul_rn(other_mean, other_n)), inv);
        n = total;
      }
    }
    const float rstd = rsqrtf(m2 * (1.f / D::hidden) + a.eps);
    const float shift = (lane_mean - mean) * rstd;  // normalised = deviation·rstd + shift
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) {
      const int c = lane + p * 32;
      if (!kEven && c >= CHUNKS) continue;
      float o[8];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        o[i] = fmaf(fmaf(v[p][i], rstd, shift), to_f(gamma8[p].v[i]), to_f(beta8[p].v[i]));
      store8(dst + row * D::hidden + c * 8, o);
    }
  }
}

template <class T, class D, int OP, bool ABSORB_PREV, int SPLITS = 0> __device__ void rowwise_op(const LayerArgs& a) {
  static_assert(OP != 4 || SPLITS == 0, "softmax reads no GEMM splits");
  if constexpr (OP == 4) softmax_rows<T, D, ABSORB_PREV>(a);
  else layernorm_rows<T, D, OP, ABSORB_PREV, SPLITS>(a);
}

}  // namespace fs
