// Flash-style attention (operators 2–5 in one stage): each block takes 128 query rows of one (batch, head),
// streams 64-key tiles of K, V and the key-mask bias through shared memory (double-buffered cp.async), keeps an
// online softmax in registers and never writes the S×S scores. Optionally stores merged heads (operator 6).
#pragma once
#include "fs_common.cuh"

namespace fs {

template <class D> struct FlashTile {
  static constexpr int BQ = 16 * kWarps;  // 16 query rows per warp
  static constexpr int BKV = 64;
  static constexpr int STRIDE = D::d + 8;  // padded rows for conflict-free ldmatrix
  static constexpr int SMEM_ELEMS = BQ * STRIDE + 4 * BKV * STRIDE;  // Q, 2×K, 2×V
  static constexpr int BIAS_FLOATS = 2 * BKV;                         // 2× the tile's key-mask bias
};

template <class T, class D> constexpr int attention_smem() {
  return FlashTile<D>::SMEM_ELEMS * int(sizeof(T)) + FlashTile<D>::BIAS_FLOATS * int(sizeof(float));
}

template <class T, class D> __host__ __device__ inline int attention_work(const LayerArgs& a) {
  return a.batch * D::heads * ceil_div(a.seq, FlashTile<D>::BQ);
}

template <class T, class D, bool MERGE_HEADS> __device__ void attention_op(const LayerArgs& a, char* smem) {
  using F = FlashTile<D>;
  constexpr int DK = D::d / 16;  // k-steps of Q·Kᵀ and n-pairs of P·V
  constexpr float kLog2e = 1.4426950408889634f;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + F::BQ * F::STRIDE;
  T* sV = sK + 2 * F::BKV * F::STRIDE;
  // The key-mask bias of each tile is staged in shared memory with K and V: the inner loop used to read it from
  // global memory, 32 loads per thread per tile, and waiting on those was the kernel's largest stall (ncu).
  float* sBias = reinterpret_cast<float*>(sV + 2 * F::BKV * F::STRIDE);
  const int S = a.seq, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long M = static_cast<long long>(a.batch) * S;
  const T* Q = static_cast<const T*>(a.qkv_heads);
  const T* K = Q + M * D::hidden;
  const T* V = K + M * D::hidden;
  const float scale_log2 = a.scale * kLog2e;
  const int q_tiles = ceil_div(S, F::BQ), kv_tiles = ceil_div(S, F::BKV);

  for (int item = blockIdx.x; item < a.batch * D::heads * q_tiles; item += gridDim.x) {
    const int bh = item / q_tiles, q0 = (item % q_tiles) * F::BQ, b = bh / D::heads, h = bh % D::heads;
    const long long head_off = static_cast<long long>(bh) * S * D::d;

    auto load_rows = [&](T* dst, const T* src, int row0, int rows) {
      for (int c = threadIdx.x; c < rows * (D::d / 8); c += kThreads) {
        const int r = c / (D::d / 8), col = (c % (D::d / 8)) * 8;
        const bool ok = row0 + r < S;
        cp_async16(dst + r * F::STRIDE + col, ok ? src + head_off + static_cast<long long>(row0 + r) * D::d + col : src, ok);
      }
    };
    // Keys past S, and every key without a mask, get a zero-filled bias (past S is masked below).
    auto load_bias = [&](float* dst, int key0) {
      if (threadIdx.x < F::BKV) {
        const int key = key0 + threadIdx.x;
        const bool ok = a.key_bias != nullptr && key < S;
        cp_async4(dst + threadIdx.x, ok ? static_cast<const void*>(a.key_bias + b * S + key) : static_cast<const void*>(Q),
                  ok);
      }
    };
    load_rows(sQ, Q, q0, F::BQ);
    load_rows(sK, K, 0, F::BKV);
    load_rows(sV, V, 0, F::BKV);
    load_bias(sBias, 0);
    cp_async_commit();

    uint32_t qf[DK][4];
    float o[D::d / 8][4];
#pragma unroll
    for (int n = 0; n < D::d / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {-FLT_MAX, -FLT_MAX}, l_run[2] = {0.f, 0.f};  // rows lane/4 and lane/4 + 8

    for (int kv = 0; kv < kv_tiles; ++kv) {
      cp_async_wait<0>();
      __syncthreads();  // tile kv is in; everyone is done with tile kv-1's buffer
      if (kv + 1 < kv_tiles) {
        const int nb = (kv + 1) % 2;
        load_rows(sK + nb * F::BKV * F::STRIDE, K, (kv + 1) * F::BKV, F::BKV);
        load_rows(sV + nb * F::BKV * F::STRIDE, V, (kv + 1) * F::BKV, F::BKV);
        load_bias(sBias + nb * F::BKV, (kv + 1) * F::BKV);
      }
      cp_async_commit();
      if (kv == 0) {
#pragma unroll
        for (int kk = 0; kk < DK; ++kk)
          ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * F::STRIDE + kk * 16 + (lane / 16) * 8);
      }
      const T* k_tile = sK + (kv % 2) * F::BKV * F::STRIDE;
      const T* v_tile = sV + (kv % 2) * F::BKV * F::STRIDE;
      const float* bias_tile = sBias + (kv % 2) * F::BKV;

      float s[F::BKV / 8][4];
#pragma unroll
      for (int n = 0; n < F::BKV / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DK; ++kk)
#pragma unroll
        for (int nj = 0; nj < F::BKV / 16; ++nj) {
          uint32_t r[4];
          ldmatrix_x4(r, k_tile + (nj * 16 + lane % 8 + (lane / 16) * 8) * F::STRIDE + kk * 16 + ((lane / 8) % 2) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma16816<T>(s[2 * nj], qf[kk], b0);
          mma16816<T>(s[2 * nj + 1], qf[kk], b1);
        }

      // Scale into the log2 domain and add the key mask; keys past S get -inf (zero probability). The mask's
      // lowest float stays finite after ×log2e, so a fully masked row still gives a uniform softmax.
      float tile_max[2] = {-FLT_MAX, -FLT_MAX};
#pragma unroll
      for (int n = 0; n < F::BKV / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + (lane % 4) * 2 + (e & 1);
          float t = -INFINITY;
          if (kv * F::BKV + col < S) t = s[n][e] * scale_log2 + fmaxf(bias_tile[col] * kLog2e, -FLT_MAX);
          s[n][e] = t;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], t);
        }
      float corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(m_run[r], tile_max[r]);
        corr[r] = fast_exp2(m_run[r] - m_new);
        m_run[r] = m_new;
      }
      float row_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < F::BKV / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = fast_exp2(s[n][e] - m_run[e / 2]);
          row_sum[e / 2] += s[n][e];
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * corr[r] + row_sum[r];
#pragma unroll
      for (int n = 0; n < D::d / 8; ++n) {
        o[n][0] *= corr[0]; o[n][1] *= corr[0];
        o[n][2] *= corr[1]; o[n][3] *= corr[1];
      }

      // O += P·V: the score accumulators are already laid out as A fragments.
#pragma unroll
      for (int kk = 0; kk < F::BKV / 16; ++kk) {
        const uint32_t pf[4] = {pack_pair<T>(s[2 * kk][0], s[2 * kk][1]), pack_pair<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int nj = 0; nj < D::d / 16; ++nj) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * F::STRIDE + nj * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma16816<T>(o[2 * nj], pf, b0);
          mma16816<T>(o[2 * nj + 1], pf, b1);
        }
      }
    }

    // Row sums are split across the four lanes of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = q0 + warp * 16 + lane / 4 + r * 8;
      if (q >= S) continue;
      const float inv = 1.f / l_run[r];
#pragma unroll
      for (int n = 0; n < D::d / 8; ++n) {
        const int col = n * 8 + (lane % 4) * 2;
        T* dst = MERGE_HEADS
            ? static_cast<T*>(a.ctx) + (static_cast<long long>(b) * S + q) * D::hidden + h * D::d + col
            : static_cast<T*>(a.ctx_heads) + head_off + static_cast<long long>(q) * D::d + col;
        store2(dst, o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
      }
    }
    __syncthreads();  // the next item reloads sQ and the K/V buffers
  }
}

}  // namespace fs
