// Flash-style attention (operators 2–5 in one stage): each item is a block of query rows of one (batch, head); a
// warp group streams 64-key tiles of K, V and the key-mask bias through shared memory (double-buffered cp.async),
// keeps an online softmax in registers and never writes the S×S scores. Optionally stores merged heads
// (operator 6). A persistent group walks its items as one stream of key tiles, prefetching across item boundaries.
//
// ROWS query rows per warp and GROUPS independent warp groups per block (each with its own item, shared memory and
// named barrier); an item is ROWS × (warps per group) query rows:
//   * 16 rows, 1 group: the block's 8 warps share a 128-row item; 128 registers a thread, so two blocks fit on an
//     SM (the shape every multi-stage segment kernel needs).
//   * 32 rows, 2 groups of 4 warps: every K and V fragment read from shared memory feeds two MMAs instead of one,
//     for 255 registers (one block per SM). 2–4 % faster than 16 rows where there are items enough for every SM.
//   * 16 rows, 2 groups of 4 warps: 64-row items at two blocks per SM, launched where the 32-row kernel's blocks
//     would fill at most half the SMs.
//
// With FROM_QKV the stage also absorbs operator 1: it reads Q, K and V straight from the QKV GEMM's [M, 3H] rows
// and applies the bias itself, so the split layout is never written. Only the Q and V biases matter: the K bias
// adds (q + b_q)·b_k to every score of a query row, a constant that softmax cancels, and since each row of
// probabilities sums to one, P·(V + b_v) = P·V + b_v is added to the output.
#pragma once
#include <type_traits>

#include "fs_common.cuh"

namespace fs {

template <class D, int ROWS, int GROUPS_> struct FlashTile {
  static_assert(ROWS == 16 || ROWS == 32, "16 or 32 query rows per warp");
  static_assert(GROUPS_ == 1 || GROUPS_ == 2, "one or two warp groups per block");
  static constexpr int MT = ROWS / 16;                    // 16-row MMA tiles per warp
  static constexpr int GROUPS = GROUPS_;                  // independent warp groups per block
  static constexpr int GROUP_THREADS = kThreads / GROUPS;
  static constexpr int BQ = ROWS * GROUP_THREADS / 32;    // query rows per item: 64 or 128
  static constexpr int BKV = 64;
  static constexpr int STRIDE = D::d + 8;  // padded rows for conflict-free ldmatrix
  static constexpr int SMEM_ELEMS = 2 * BQ * STRIDE + 4 * BKV * STRIDE;  // Q, 2×K, 2×V, output staging
  static constexpr int BIAS_FLOATS = 2 * BKV;  // 2× the tile's key-mask bias
};

template <class T, class D, int ROWS, int GROUPS> __host__ __device__ constexpr int attention_group_smem() {
  using F = FlashTile<D, ROWS, GROUPS>;
  return F::SMEM_ELEMS * int(sizeof(T)) + F::BIAS_FLOATS * int(sizeof(float));
}
template <class T, class D, int ROWS, int GROUPS> __host__ __device__ constexpr int attention_smem() {
  return GROUPS * attention_group_smem<T, D, ROWS, GROUPS>();
}

// Blocks the stage can use: one item per warp group.
template <class T, class D, int ROWS, int GROUPS> __host__ __device__ inline int attention_work(const LayerArgs& a) {
  using F = FlashTile<D, ROWS, GROUPS>;
  return ceil_div(a.batch * D::heads * ceil_div(a.seq, F::BQ), F::GROUPS);
}

template <class T, class D, int ROWS, int GROUPS, bool MERGE_HEADS, bool FROM_QKV>
__device__ void attention_op(const LayerArgs& a, char* smem) {
  using F = FlashTile<D, ROWS, GROUPS>;
  constexpr int MT = F::MT;
  constexpr int DK = D::d / 16;  // k-steps of Q·Kᵀ and n-pairs of P·V
  constexpr float kLog2e = 1.4426950408889634f;
  const int group = threadIdx.x / F::GROUP_THREADS, tid = threadIdx.x % F::GROUP_THREADS;
  const int warp = tid / 32, lane = tid % 32;
  T* sQ = reinterpret_cast<T*>(smem + group * attention_group_smem<T, D, ROWS, GROUPS>());
  T* sK = sQ + F::BQ * F::STRIDE;
  T* sV = sK + 2 * F::BKV * F::STRIDE;
  T* sO = sV + 2 * F::BKV * F::STRIDE;  // each warp stages its output rows for whole 16-byte stores
  // The key-mask bias of each tile is staged in shared memory with K and V: reading it from global memory in the
  // inner loop was the kernel's largest stall (ncu). Each staging thread turns its own element into the log2
  // domain once, so the inner loop is one FFMA per score with no bounds checks.
  float* sBias = reinterpret_cast<float*>(sO + F::BQ * F::STRIDE);
  auto group_sync = [&] {
    if constexpr (F::GROUPS == 1) __syncthreads();
    else named_barrier(1 + group, F::GROUP_THREADS);
  };
  const int S = a.seq;
  const long long M = static_cast<long long>(a.batch) * S;
  // Q, K and V: rows of one head, kRowStride apart; K and V sit kv_offset and 2·kv_offset after Q.
  constexpr long long kRowStride = FROM_QKV ? 3 * D::hidden : D::d;
  const long long kv_offset = FROM_QKV ? D::hidden : M * D::hidden;
  const T* Q = static_cast<const T*>(FROM_QKV ? a.qkv : a.qkv_heads);
  const T* K = Q + kv_offset;
  const T* V = K + kv_offset;
  const float scale_log2 = a.scale * kLog2e;
  const int q_tiles = ceil_div(S, F::BQ), kv_tiles = ceil_div(S, F::BKV);
  const int items = a.batch * D::heads * q_tiles;

  // Offset of an item's head in [B, heads, S, d] (the layout of operator 5's output), and in the inputs.
  auto head_offset = [&](int item) { return static_cast<long long>(item / q_tiles) * S * D::d; };
  auto input_offset = [&](int item) {
    if constexpr (!FROM_QKV) return head_offset(item);
    const int bh = item / q_tiles;
    return static_cast<long long>(bh / D::heads) * S * kRowStride + (bh % D::heads) * D::d;
  };
  // A thread copies the same 16-byte column of every kRowStep-th row: its addresses are worked out once per
  // call and then stepped by constants (per-chunk 64-bit address arithmetic was a fifth of a key tile's work).
  auto load_rows = [&](T* dst, const T* src, long long head_off, int row0, auto rows_tag) {
    constexpr int rows = decltype(rows_tag)::value, kChunks = D::d / 8, kRowStep = F::GROUP_THREADS / kChunks;
    static_assert(F::GROUP_THREADS % kChunks == 0 && rows % kRowStep == 0, "16-byte chunks split evenly over the group");
    const int r = tid / kChunks, col = (tid % kChunks) * 8, rows_left = S - row0 - r;
    const T* from = src + head_off + static_cast<long long>(row0 + r) * kRowStride + col;
    T* to = dst + r * F::STRIDE + col;
#pragma unroll
    for (int i = 0; i < rows / kRowStep; ++i) {  // rows past S are zero-filled from the tensor's first element
      const bool ok = i * kRowStep < rows_left;
      cp_async16(to + i * kRowStep * F::STRIDE, ok ? from + static_cast<long long>(i) * kRowStep * kRowStride : src, ok);
    }
  };
  // Where an item's inputs start: its head in Q, K and V, and its sequence's row of the key-mask bias. Worked
  // out once per item, so a key tile's loads cost no integer divisions.
  struct ItemInputs {
    long long head_off;
    int bias_off;
  };
  auto inputs_of = [&](int item) { return ItemInputs{input_offset(item), item / q_tiles / D::heads * S}; };
  // K, V and the raw key-mask bias of key tile kv into buffer buf; zero-filled past S or without a mask.
  auto load_kv = [&](const ItemInputs& in, int kv, int buf) {
    load_rows(sK + buf * F::BKV * F::STRIDE, K, in.head_off, kv * F::BKV, std::integral_constant<int, F::BKV>{});
    load_rows(sV + buf * F::BKV * F::STRIDE, V, in.head_off, kv * F::BKV, std::integral_constant<int, F::BKV>{});
    if (tid < F::BKV) {
      const int key = kv * F::BKV + tid;
      const bool ok = a.key_bias != nullptr && key < S;
      cp_async4(sBias + buf * F::BKV + tid, ok ? static_cast<const void*>(a.key_bias + in.bias_off + key) : static_cast<const void*>(Q), ok);
    }
  };

  // One flat stream of (item, key tile) steps per group: the last tile of an item prefetches the first tile and
  // the queries of the next, so a persistent group never waits on a cold load between items.
  const int item_stride = gridDim.x * F::GROUPS;
  int item = blockIdx.x * F::GROUPS + group, kv = 0, buf = 0;
  if (item >= items) return;
  ItemInputs current = inputs_of(item);
  load_rows(sQ, Q, current.head_off, (item % q_tiles) * F::BQ, std::integral_constant<int, F::BQ>{});
  load_kv(current, 0, 0);
  cp_async_commit();

  uint32_t qf[MT][DK][4];
  float o[MT][D::d / 8][4];
  float m_run[MT][2];  // per MMA tile, rows lane/4 and lane/4 + 8
  // Row sums of the probabilities as the tensor cores see them (rounded to T), accumulated by one more MMA per
  // k-step, P·1: an accumulator tile whose columns all hold the row's sum, {0, 1} for row lane/4 and {2, 3} for
  // lane/4 + 8. It costs an MMA per 16 keys where a sum in registers cost an add per score and two shuffles.
  float l_run[MT][4];
  const uint32_t ones[2] = {pack_pair<T>(1.f, 1.f), pack_pair<T>(1.f, 1.f)};
  while (true) {
    cp_async_wait<0>();
    if (tid < F::BKV) {
      // Keys past S get -inf (zero probability). The mask's lowest float stays finite after ×log2e, so a fully
      // masked row still gives a uniform softmax, as the reference does.
      float* bias = sBias + buf * F::BKV + tid;
      *bias = kv * F::BKV + tid < S ? fmaxf(*bias * kLog2e, -FLT_MAX) : -INFINITY;
    }
    group_sync();  // this step's tile is in; everyone is done with the other buffer
    if (kv == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < DK; ++kk)
          ldmatrix_x4(qf[mt][kk], sQ + (warp * ROWS + mt * 16 + lane % 16) * F::STRIDE + kk * 16 + (lane / 16) * 8);
      if constexpr (FROM_QKV) {
        // Operator 1's Q bias, rounded to T as the split would store it; fragment register j holds columns
        // kk·16 + (j / 2)·8 + (lane % 4)·2 + {0, 1}.
        const T* bias = static_cast<const T*>(a.b_qkv) + (item / q_tiles % D::heads) * D::d + (lane % 4) * 2;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int col = kk * 16 + (j / 2) * 8;
            const float b0 = to_f(bias[col]), b1 = to_f(bias[col + 1]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              typename Elem<T>::Pair q = *reinterpret_cast<const typename Elem<T>::Pair*>(&qf[mt][kk][j]);
              q = Elem<T>::pack(to_f(q.x) + b0, to_f(q.y) + b1);
              qf[mt][kk][j] = *reinterpret_cast<const uint32_t*>(&q);
            }
          }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < D::d / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m_run[mt][0] = m_run[mt][1] = -FLT_MAX;
        l_run[mt][0] = l_run[mt][1] = l_run[mt][2] = l_run[mt][3] = 0.f;
      }
    }
    const bool last_tile = kv + 1 == kv_tiles;
    const int next_item = last_tile ? item + item_stride : item, next_kv = last_tile ? 0 : kv + 1;
    ItemInputs next = current;
    if (next_item < items) {
      if (last_tile) {
        if (kv == 0) group_sync();  // one key tile per item: every warp must hold its queries before sQ refills
        next = inputs_of(next_item);
        load_rows(sQ, Q, next.head_off, (next_item % q_tiles) * F::BQ, std::integral_constant<int, F::BQ>{});
      }
      load_kv(next, next_kv, buf ^ 1);
    }
    cp_async_commit();

    const T* k_tile = sK + buf * F::BKV * F::STRIDE;
    const T* v_tile = sV + buf * F::BKV * F::STRIDE;
    const float* bias_tile = sBias + buf * F::BKV;
    float s[MT][F::BKV / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < F::BKV / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK; ++kk)
#pragma unroll
      for (int nj = 0; nj < F::BKV / 16; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, k_tile + (nj * 16 + lane % 8 + (lane / 16) * 8) * F::STRIDE + kk * 16 + ((lane / 8) % 2) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(s[mt][2 * nj], qf[mt][kk], b0);
          mma16816<T>(s[mt][2 * nj + 1], qf[mt][kk], b1);
        }
      }

    // Scores into the log2 domain plus the staged bias, and each row's maximum over the tile.
    float tile_max[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      tile_max[mt][0] = tile_max[mt][1] = -FLT_MAX;
#pragma unroll
      for (int n = 0; n < F::BKV / 8; ++n) {
        const float2 bias = *reinterpret_cast<const float2*>(bias_tile + n * 8 + (lane % 4) * 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][n][e] = fmaf(s[mt][n][e], scale_log2, e & 1 ? bias.y : bias.x);
          tile_max[mt][e / 2] = fmaxf(tile_max[mt][e / 2], s[mt][n][e]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[mt][r] = fmaxf(tile_max[mt][r], __shfl_xor_sync(0xffffffffu, tile_max[mt][r], 1));
        tile_max[mt][r] = fmaxf(tile_max[mt][r], __shfl_xor_sync(0xffffffffu, tile_max[mt][r], 2));
      }
    }
    // Online softmax with lazy rescaling: a row keeps its running maximum until a tile exceeds it by more than
    // kSlack (log2 units), so probabilities stay ≤ 2^kSlack (exact enough in T and in the fp32 sums), and the
    // output and row sums are rescaled only when some row of the warp needs it: after the first key tiles,
    // hardly ever. A row whose keys so far were all masked moves to its first real maximum at once.
    constexpr float kSlack = 8.f;
    bool grow = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) grow |= tile_max[mt][r] > m_run[mt][r] + kSlack;
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = fmaxf(m_run[mt][r], tile_max[mt][r]);
          corr[r] = fast_exp2(m_run[mt][r] - m_new);
          m_run[mt][r] = m_new;
        }
        l_run[mt][0] *= corr[0]; l_run[mt][1] *= corr[0];
        l_run[mt][2] *= corr[1]; l_run[mt][3] *= corr[1];
#pragma unroll
        for (int n = 0; n < D::d / 8; ++n) {
          o[mt][n][0] *= corr[0]; o[mt][n][1] *= corr[0];
          o[mt][n][2] *= corr[1]; o[mt][n][3] *= corr[1];
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < F::BKV / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][n][e] = fast_exp2(s[mt][n][e] - m_run[mt][e / 2]);

    // O += P·V and l += P·1: the score accumulators are already laid out as A fragments.
#pragma unroll
    for (int kk = 0; kk < F::BKV / 16; ++kk) {
      uint32_t pf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pf[mt][0] = pack_pair<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pf[mt][1] = pack_pair<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pf[mt][2] = pack_pair<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pf[mt][3] = pack_pair<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        mma16816<T>(l_run[mt], pf[mt], ones);
      }
#pragma unroll
      for (int nj = 0; nj < D::d / 16; ++nj) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * F::STRIDE + nj * 16 + (lane / 16) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(o[mt][2 * nj], pf[mt], b0);
          mma16816<T>(o[mt][2 * nj + 1], pf[mt], b1);
        }
      }
    }

    if (last_tile) {
      // Each warp stages its rows for 16-byte stores.
      T* staged = sO + warp * ROWS * F::STRIDE;
      const int bh = item / q_tiles, b = bh / D::heads, h = bh % D::heads;
      // Operator 1's V bias (zero without FROM_QKV), at this lane's columns n·8 + (lane % 4)·2 + {0, 1}.
      const T* v_bias = static_cast<const T*>(a.b_qkv) + 2 * D::hidden + h * D::d + (lane % 4) * 2;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float inv = 1.f / l_run[mt][2 * r];
#pragma unroll
          for (int n = 0; n < D::d / 8; ++n) {
            const float b0 = FROM_QKV ? to_f(v_bias[n * 8]) : 0.f, b1 = FROM_QKV ? to_f(v_bias[n * 8 + 1]) : 0.f;
            store2(staged + (mt * 16 + lane / 4 + r * 8) * F::STRIDE + n * 8 + (lane % 4) * 2,
                   fmaf(o[mt][n][2 * r], inv, b0), fmaf(o[mt][n][2 * r + 1], inv, b1));
          }
        }
      __syncwarp();
      const int row0 = (item % q_tiles) * F::BQ + warp * ROWS;
#pragma unroll
      for (int i = 0; i < ROWS * (D::d / 8) / 32; ++i) {
        const int c = i * 32 + lane, r = c / (D::d / 8), col = (c % (D::d / 8)) * 8, q = row0 + r;
        if (q >= S) continue;
        T* dst = MERGE_HEADS
            ? static_cast<T*>(a.ctx) + (static_cast<long long>(b) * S + q) * D::hidden + h * D::d + col
            : static_cast<T*>(a.ctx_heads) + head_offset(item) + static_cast<long long>(q) * D::d + col;
        *reinterpret_cast<Vec8<T>*>(dst) = *reinterpret_cast<const Vec8<T>*>(staged + r * F::STRIDE + col);
      }
      __syncwarp();  // the next item's rows overwrite this staging area
    }
    if (next_item >= items) break;
    item = next_item;
    current = next;
    kv = next_kv;
    buf ^= 1;
  }
}

}  // namespace fs
