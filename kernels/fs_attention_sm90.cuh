// Flash attention on Hopper's warpgroup MMAs: the attention stage of fs_attention.cuh (operators 2–5, with
// operator 1's split and bias and operator 6's merged-head store where the segment holds them) as a kernel of its
// own for sm_90a. With mma.sync a warp's softmax and its MMAs take turns; a warpgroup MMA runs asynchronously
// from shared-memory operands, so the softmax of one key tile runs while the tensor cores work on another.
//
// Each block is one warp group owning 64 query rows of one (batch, head); BLOCKS blocks share an SM, so one
// block's loads and epilogue run under another's MMAs. Per key tile j of BKV keys, in order of issue:
// S_j = Q·K_jᵀ (both operands in shared memory), O += P_{j-1}·V_{j-1} (P from the registers that held S_{j-1}:
// the accumulator layout is the A-operand layout; V read transposed from shared memory), then the softmax of S_j
// under the P·V MMAs. K (with the tile's key-mask bias) runs one tile ahead of V through two buffers each, copied
// with cp.async under the MMAs. Same numerics as fs_attention.cuh: log2-domain scores, lazy rescaling, keys past
// S at -inf, fully masked rows uniform.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cute/arch/mma_sm90.hpp"
#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "fs_args.h"
#include "fs_common.cuh"
#include "fs_sm90.cuh"

namespace fs::sm90 {
using namespace cute;

// From this sequence length on, the attention segment runs here (one key tile is all a shorter sequence has, and
// with it nothing to overlap); below kLongTileSeq on 64-key tiles, with fewer registers and four blocks an SM.
constexpr int kAttentionMinSeq = 128;
constexpr int kLongTileSeq = 256;
// From this many key tiles on, a block skips the tiles past its sequence's last open key (padding).
constexpr int kSkipPaddingMinTiles = 4;

template <class T, class D, int BKV_, int BLOCKS> struct WgmmaAttention {
  using E = typename CutlassType<T>::type;
  static constexpr int kD = 64;
  static_assert(D::d == kD, "warpgroup attention is written for head size 64");
  static constexpr int kThreads = 128;  // one warp group
  static constexpr int BQ = 64, BKV = BKV_, kBlocksPerSm = BLOCKS;
  static_assert(BKV == 64 || BKV == 128, "64 or 128 keys per tile");
  // 128-byte swizzled rows (64 elements): conflict-free for the copies and the MMAs' shared-memory reads.
  using LayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<BQ>, Int<kD>>{}));
  using LayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<BKV>, Int<kD>, _2>{}));
  // V as the B operand of P·V: (N = head dim, K = keys), head dim contiguous.
  using LayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<kD>, Int<BKV>, _2>{}));
  using MmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<_64, Int<BKV>, Int<kD>>>()));
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<_64, Int<kD>, Int<BKV>>, GMMA::Major::K, GMMA::Major::MN>()));
  struct Smem {
    alignas(1024) E q[cosize_v<LayoutQ>];  // also stages the output rows
    alignas(1024) E k[cosize_v<LayoutK>];
    alignas(1024) E v[cosize_v<LayoutVt>];
    float bias[2][BKV];
    int last_open[kThreads / 32];  // per warp, the last key of the sequence that is not masked
  };
  static constexpr int kSmemBytes = int(sizeof(Smem)) + 1024;  // + room to align the base to 1024 bytes
};

// Issue one batch of warpgroup MMAs C (+)= A·B over the k blocks of A and B; the caller waits on it.
template <bool ZERO_INIT, class Mma, class FragA, class FragB, class FragC>
__device__ __forceinline__ void wgmma_batch(Mma& mma, const FragA& a, const FragB& b, FragC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (ZERO_INIT) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// Shared-memory writes of the generic proxy (cp.async, st.shared) made visible to the MMAs' async proxy.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The online softmax of one thread's share of a 64×BKV score tile, in the accumulator layout of a warpgroup MMA:
// register i holds row (i / 2) % 2 (of this thread's two rows, lane / 4 and lane / 4 + 8 of its warp's 16) and
// column (i / 4)·8 + (lane % 4)·2 + i % 2.
struct OnlineSoftmax {
  float m_run[2] = {-FLT_MAX, -FLT_MAX}, l_run[2] = {0.f, 0.f};

  // Scores into the log2 domain plus the key bias (already ×log2e), then probabilities in place. Returns whether
  // some row of the warp moved its maximum; corr then holds the factor each row's earlier output must be scaled
  // by (1 where it keeps its maximum), for the caller to apply once the output is no longer an MMA operand.
  template <class Frag>
  __device__ __forceinline__ bool update(Frag& s, const float* bias_tile, float scale_log2, int lane, float corr[2]) {
    constexpr int kCols = size(Frag{}) / 4;  // 8-column blocks
    float tile_max[2] = {-FLT_MAX, -FLT_MAX};
    CUTE_UNROLL
    for (int n = 0; n < kCols; ++n) {
      const float2 bias = *reinterpret_cast<const float2*>(bias_tile + n * 8 + (lane % 4) * 2);
      CUTE_UNROLL
      for (int e = 0; e < 4; ++e) {
        float& v = s(n * 4 + e);
        v = fmaf(v, scale_log2, e & 1 ? bias.y : bias.x);
        tile_max[e / 2] = fmaxf(tile_max[e / 2], v);
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      corr[r] = 1.f;
    }
    // Lazy rescaling as in fs_attention.cuh: a row keeps its maximum until a tile exceeds it by more than kSlack
    // (log2 units), so probabilities stay ≤ 2^kSlack; rows whose keys so far were all masked move at once.
    constexpr float kSlack = 8.f;
    const bool grow = __any_sync(0xffffffffu, tile_max[0] > m_run[0] + kSlack || tile_max[1] > m_run[1] + kSlack);
    if (grow) {
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m_run[r], tile_max[r]);
        corr[r] = fast_exp2(m_run[r] - m_new);
        m_run[r] = m_new;
        l_run[r] *= corr[r];
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < size(s); ++i) {
      s(i) = fast_exp2(s(i) - m_run[(i / 2) % 2]);
      l_run[(i / 2) % 2] += s(i);
    }
    return grow;
  }
};

template <class T, class D, int BKV, int BLOCKS, bool MERGE_HEADS, bool FROM_QKV>
__global__ void __launch_bounds__(128, BLOCKS) wgmma_attention_kernel(const LayerArgs a) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using W = WgmmaAttention<T, D, BKV, BLOCKS>;
  using E = typename W::E;
  constexpr int kD = W::kD, BQ = W::BQ;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ char smem_raw[];
  // Rounded up to 1024 bytes by pointer arithmetic, not through an integer, so that the compiler still knows an
  // access through `sm` is to shared memory (LDS/STS, not generic loads and stores).
  auto& sm = *reinterpret_cast<typename W::Smem*>(smem_raw + (1024u - smem_addr(smem_raw) % 1024u) % 1024u);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename W::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sm.k), typename W::LayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(sm.v), typename W::LayoutVt{});

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int S = a.seq, q_tiles = ceil_div(S, BQ), kv_tiles = ceil_div(S, BKV);
  const int bh = blockIdx.x / q_tiles, q0 = (blockIdx.x % q_tiles) * BQ;
  const int b = bh / D::heads, h = bh % D::heads;
  const long long M = static_cast<long long>(a.batch) * S;
  // Q, K and V: rows of one head, kRowStride apart; K and V sit kv_offset and 2·kv_offset after Q.
  constexpr long long kRowStride = FROM_QKV ? 3 * D::hidden : kD;
  const long long kv_offset = FROM_QKV ? D::hidden : M * D::hidden;
  const T* Q = static_cast<const T*>(FROM_QKV ? a.qkv : a.qkv_heads);
  const T* K = Q + kv_offset;
  const T* V = K + kv_offset;
  const long long head_off = FROM_QKV ? static_cast<long long>(b) * S * kRowStride + h * kD
                                      : static_cast<long long>(bh) * S * kD;

  // A thread copies the same 16-byte column (c0) of every kRowStep-th row from r0 on. In the 128-byte-swizzled
  // layouts a row's swizzle depends on the row modulo 8 only, so row r0 + i·kRowStep of a column sits i·kRowStep
  // rows after row r0 in shared memory as in global memory: both addresses are worked out once and stepped by
  // constants (the layouts' own arithmetic at every copy cost about 50 instructions a copy).
  constexpr int kChunks = kD / 8, kRowStep = W::kThreads / kChunks;
  const int r0 = tid / kChunks, c0 = (tid % kChunks) * 8;
  E* const q_dst = raw_pointer_cast(&sQ(r0, c0));
  E* const k_dst = raw_pointer_cast(&sK(r0, c0, 0));
  E* const v_dst = raw_pointer_cast(&sVt(c0, r0, 0));
  // Rows row0 … row0 + ROWS − 1 of a head into dst (this thread's first chunk), zero-filled past S.
  auto load_rows = [&](const T* src, int row0, E* dst, auto rows_tag) {
    constexpr int rows = decltype(rows_tag)::value;
    static_assert(rows % kRowStep == 0, "16-byte chunks split evenly over the warp group");
    const T* from = src + head_off + static_cast<long long>(row0 + r0) * kRowStride + c0;
    if (row0 + rows <= S) {  // every tile but a sequence's ragged last one: no bounds to check
#pragma unroll
      for (int i = 0; i < rows / kRowStep; ++i) cp_async16(dst + i * kRowStep * kD, from + i * kRowStep * kRowStride, true);
      return;
    }
    const int rows_left = S - row0 - r0;
#pragma unroll
    for (int i = 0; i < rows / kRowStep; ++i) {
      const bool ok = i * kRowStep < rows_left;
      cp_async16(dst + i * kRowStep * kD, ok ? from + static_cast<long long>(i) * kRowStep * kRowStride : src, ok);
    }
  };
  auto load_k = [&](int kv) {  // with the tile's key-mask bias
    const int buf = kv % 2;
    load_rows(K, kv * BKV, k_dst + buf * BKV * kD, Int<BKV>{});
    if (tid < BKV) {
      const int key = kv * BKV + tid;
      const bool ok = a.key_bias != nullptr && key < S;
      cp_async4(&sm.bias[buf][tid], ok ? static_cast<const void*>(a.key_bias + static_cast<long long>(b) * S + key)
                                       : static_cast<const void*>(Q), ok);
    }
  };
  auto load_v = [&](int kv) {
    load_rows(V, kv * BKV, v_dst + (kv % 2) * BKV * kD, Int<BKV>{});
  };
  // Once this thread's copies of tile kv have landed: its bias elements into the log2 domain, -inf past S.
  auto finish_bias = [&](int kv) {
    if (tid < BKV) {
      float& bias = sm.bias[kv % 2][tid];
      bias = kv * BKV + tid < S ? fmaxf(bias * kLog2e, -FLT_MAX) : -INFINITY;
    }
  };

  typename W::MmaS mma_s;
  typename W::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);    // (MMA, N, K, buffer)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);   // (MMA, N, K, buffer)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<BQ>, Int<BKV>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<BQ>, Int<kD>>{});
  // P as the A operand of P·V: register j of S (j = col pair + 2·row half + 4·(8-key block)) is register j of P.
  Tensor tOrP = make_tensor<E>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<BKV / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>{});
  static_assert(size(tSrS) == BKV / 2 && size(tOrO) == kD / 2 && size(tOrP) == size(tSrS), "one warp group's m64 fragments");
  auto p_pairs = recast<uint32_t>(tOrP);
  auto to_p = [&] {
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); i += 2) p_pairs(i / 2) = pack_pair<T>(tSrS(i), tSrS(i + 1));
    warpgroup_fence_operand(tOrP);  // written before the MMA that reads it is issued
  };
  auto rescale_o = [&](const float corr[2]) {
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= corr[(i / 2) % 2];
  };
  clear(tOrO);
  OnlineSoftmax softmax;
  const float scale_log2 = a.scale * kLog2e;
  float corr[2];

  // Tile 0: Q and K_0 in, S_0, its softmax, P_0; V_0 and K_1 load meanwhile.
  load_rows(Q, q0, q_dst, Int<BQ>{});
  load_k(0);
  cp_async_commit();
  // A padded sequence ends in masked keys. Past its last open key a tile adds exp2(-FLT_MAX - m) = 0 to every
  // sum and never moves a row's (finite) maximum, so the key loop stops after the last tile with an open key;
  // the results are the same bits. The scan runs under the copies above. A sequence with no open key runs every
  // tile, for the uniform softmax the reference gives. Below kSkipPaddingMinTiles tiles there is little to skip
  // and the scan cost more than it saved (+3 % at 256 keys on the H100).
  {
    int last_open = -1;
    if (a.key_bias != nullptr && kv_tiles >= kSkipPaddingMinTiles) {
      // kScan keys a thread per round, all loads issued before any is compared: one memory latency a round.
      constexpr int kScan = 4;
      const float* row_bias = a.key_bias + static_cast<long long>(b) * S;
      for (int key0 = tid; key0 < S; key0 += kScan * W::kThreads) {
        float bias[kScan];
#pragma unroll
        for (int j = 0; j < kScan; ++j) bias[j] = key0 + j * W::kThreads < S ? row_bias[key0 + j * W::kThreads] : -INFINITY;
#pragma unroll
        for (int j = 0; j < kScan; ++j)
          if (bias[j] * kLog2e > -FLT_MAX) last_open = key0 + j * W::kThreads;  // open as finish_bias sees it
      }
    } else {
      last_open = S - 1;
    }
    last_open = __reduce_max_sync(0xffffffffu, last_open);
    if (lane == 0) sm.last_open[warp] = last_open;
  }
  cp_async_wait<0>();
  if constexpr (FROM_QKV) {
    // Operator 1's Q bias on the chunks this thread copied (column c0 of every kRowStep-th row), rounded to T as
    // the split would store it.
    float bias[8];
    load8(static_cast<const T*>(a.b_qkv) + h * kD + c0, bias);
#pragma unroll
    for (int i = 0; i < BQ / kRowStep; ++i) {
      T* chunk = reinterpret_cast<T*>(q_dst + i * kRowStep * kD);
      float q[8];
      load8(chunk, q);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] += bias[j];
      store8(chunk, q);
    }
  }
  finish_bias(0);
  fence_async_shared();
  __syncthreads();
  int kv_end = kv_tiles;
  {
    int last_open = sm.last_open[0];
    CUTE_UNROLL
    for (int w = 1; w < W::kThreads / 32; ++w) last_open = max(last_open, sm.last_open[w]);
    if (last_open >= 0) kv_end = last_open / BKV + 1;
  }
  load_v(0);
  if (kv_end > 1) load_k(1);
  cp_async_commit();
  wgmma_batch<true>(mma_s, tSrQ, tSrK(_, _, _, 0), tSrS);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
  softmax.update(tSrS, sm.bias[0], scale_log2, lane, corr);
  to_p();

  for (int kv = 1; kv < kv_end; ++kv) {
    cp_async_wait<0>();  // K_kv and V_{kv-1}
    finish_bias(kv);
    fence_async_shared();
    __syncthreads();  // every warp is done with K_{kv-1} and V_{kv-2}, whose buffers refill now
    load_v(kv);
    if (kv + 1 < kv_end) load_k(kv + 1);
    cp_async_commit();
    wgmma_batch<true>(mma_s, tSrQ, tSrK(_, _, _, kv % 2), tSrS);
    wgmma_batch<false>(mma_o, tOrP, tOrV(_, _, _, (kv - 1) % 2), tOrO);
    warpgroup_wait<1>();  // S_kv is in; P_{kv-1}·V_{kv-1} still runs
    warpgroup_fence_operand(tSrS);
    const bool rescale = softmax.update(tSrS, sm.bias[kv % 2], scale_log2, lane, corr);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    if (rescale) rescale_o(corr);  // after the first tiles hardly ever
    to_p();
  }
  cp_async_wait<0>();  // V of the last tile
  fence_async_shared();
  __syncthreads();
  wgmma_batch<false>(mma_o, tOrP, tOrV(_, _, _, (kv_end - 1) % 2), tOrO);
  // Operator 1's V bias at this thread's output columns n·8 + (lane % 4)·2, loaded under the last P·V MMA.
  using Pair = typename Elem<T>::Pair;
  Pair v_bias[kD / 8];
  CUTE_UNROLL
  for (int n = 0; n < kD / 8; ++n)
    v_bias[n] = FROM_QKV ? reinterpret_cast<const Pair*>(static_cast<const T*>(a.b_qkv) + 2 * D::hidden + h * kD +
                                                         (lane % 4) * 2)[n * 4]
                         : Pair{};
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);

  // Normalise, add the V bias, stage the rows in sQ (no MMA reads it any more), then 16-byte stores.
  float inv[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    float l = softmax.l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = 1.f / l;
  }
  // This thread holds rows row0 and row0 + 8 (row0 = 16·warp + lane / 4) at columns n·8 + (lane % 4)·2. sQ's
  // 128-byte rows hold 16-byte chunk n at chunk n ^ (row % 8), and row % 8 = (lane / 4) % 8 for both rows: every
  // store is an XOR off one base address (the layout's own arithmetic cost about 10 instructions a store).
  const int row0 = warp * 16 + lane / 4, swizzle = (lane / 4) % 8;
  E* const stage = sm.q + row0 * kD + (lane % 4) * 2;
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); i += 2) {
    const int n = i / 4, r = (i / 2) % 2;
    const float b0 = FROM_QKV ? to_f(v_bias[n].x) : 0.f, b1 = FROM_QKV ? to_f(v_bias[n].y) : 0.f;
    store2(reinterpret_cast<T*>(stage + r * 8 * kD + (n ^ swizzle) * 8), fmaf(tOrO(i), inv[r], b0),
           fmaf(tOrO(i + 1), inv[r], b1));
  }
  __syncthreads();
  // Back out in the copies' order: column c0 of every kRowStep-th row from r0 on, at q_dst's addresses (worked out
  // again from sm.q: q_dst's 64-bit generic address kept across the key-tile loop spilled).
  const E* const staged = sm.q + r0 * kD + ((c0 / 8) ^ (r0 % 8)) * 8;
  T* dst = MERGE_HEADS ? static_cast<T*>(a.ctx) + (static_cast<long long>(b) * S + q0 + r0) * D::hidden + h * kD + c0
                       : static_cast<T*>(a.ctx_heads) + (static_cast<long long>(bh) * S + q0 + r0) * kD + c0;
  constexpr long long kDstRowStride = MERGE_HEADS ? D::hidden : kD;
#pragma unroll
  for (int i = 0; i < BQ / kRowStep; ++i) {
    if (q0 + r0 + i * kRowStep >= S) break;
    *reinterpret_cast<Vec8<T>*>(dst + i * kRowStep * kDstRowStride) =
        *reinterpret_cast<const Vec8<T>*>(staged + i * kRowStep * kD);
  }
#endif
}

template <class T, class D, bool MERGE_HEADS, bool FROM_QKV, int BKV, int BLOCKS>
cudaError_t launch_attention(const LayerArgs& a, cudaStream_t stream) {
  using W = WgmmaAttention<T, D, BKV, BLOCKS>;
  const auto kernel = wgmma_attention_kernel<T, D, BKV, BLOCKS, MERGE_HEADS, FROM_QKV>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, W::kSmemBytes);
  if (err != cudaSuccess) return err;
  const long long blocks = static_cast<long long>(a.batch) * D::heads * ceil_div(a.seq, W::BQ);
  kernel<<<static_cast<unsigned>(blocks), W::kThreads, W::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

// The attention stage on an sm_90 GPU. cudaErrorNotSupported: not an sm_90 GPU or a shorter sequence than
// kAttentionMinSeq; nothing was launched and the caller runs its own kernel.
template <class T, class D, bool MERGE_HEADS, bool FROM_QKV>
cudaError_t segment_attention(const LayerArgs& a, cudaStream_t stream) {
  if (a.seq < kAttentionMinSeq || !on_sm90()) return cudaErrorNotSupported;
  if (a.seq < kLongTileSeq) return launch_attention<T, D, MERGE_HEADS, FROM_QKV, 64, 4>(a, stream);
  return launch_attention<T, D, MERGE_HEADS, FROM_QKV, 128, 3>(a, stream);
}

}  // namespace fs::sm90
