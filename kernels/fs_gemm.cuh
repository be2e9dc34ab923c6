// Tensor-core GEMM over a persistent grid: C[b] = A[b]·B[b] with mma.sync m16n8k16, fp32 accumulation,
// a cp.async multistage pipeline and an epilogue functor that receives pairs of adjacent outputs.
#pragma once
#include "fs_common.cuh"

namespace fs {

struct GemmShape {
  int M, N, K, batch;
};

// A as a row-major [M, K] matrix per batch entry; any 8-element chunk along K is contiguous.
template <class T> struct RowMajorA {
  const T* base;
  long long ld, batch_stride;
  __device__ __forceinline__ const T* chunk(int b, int row, int k) const {
    return base + b * batch_stride + row * ld + k;
  }
};

// B in nn.Linear layout ([N, K], K contiguous) or, with KMAJOR, as [K, N] with N contiguous.
template <class T> struct MatB {
  const T* base;
  long long ld, batch_stride;
};

// Split-K for GEMMs with few rows: too few output tiles to fill the GPU and long K loops that are bound by
// memory latency. Each tile's K range is split; every split stores its fp32 partial tile, and the last block
// to arrive at the tile's counter adds them up and runs the epilogue (no grid barrier needed).
constexpr int kSplitKMaxRows = 512;
constexpr int kSplitKMaxWork = 512;          // tiles × splits; bounds the scratch buffer
static_assert(kSplitKMaxWork <= kGridBarrierWord, "the split-K counters must end before the grid barrier's");
constexpr int kSplitKTargetWork = 264;       // about two blocks per SM of a 132-SM GPU
constexpr int kSplitKOneWaveWork = 132;      // one block per SM, for tiles with deep K steps
constexpr int kSplitKMinK = 128;             // K elements each split keeps at least

struct SplitK {
  float* partials;
  unsigned int* counters;
};

// ONE_WAVE keeps tiles × splits within one block per SM: each block then streams at least one deep K step in
// one go, and fewer splits mean a shorter fix-up (experiments/skinny_probe: at 32 rows FFN1 takes 6.7 µs with 2
// splits, 8.3 with 3; a second wave of blocks would double the time). The K tiles are dealt evenly, so no split
// is left empty.
__host__ __device__ inline int splitk_splits(const GemmShape& g, int tiles, int bk, bool one_wave) {
  if (g.M > kSplitKMaxRows || g.batch != 1) return 1;
  const int k_tiles = ceil_div(g.K, bk);
  int splits = one_wave ? kSplitKOneWaveWork / tiles : ceil_div(kSplitKTargetWork, tiles);
  const int by_k = k_tiles / (kSplitKMinK > bk ? kSplitKMinK / bk : 1);
  splits = splits < by_k ? splits : by_k;
  splits = splits < kSplitKMaxWork / tiles ? splits : kSplitKMaxWork / tiles;
  if (splits <= 1) return 1;
  return one_wave ? ceil_div(k_tiles, ceil_div(k_tiles, splits)) : splits;
}

template <class T, int BM_, int BN_, int WARPS_M_, bool B_KMAJOR_, int STAGES_ = 3, int BK_ = 32,
          bool ONE_WAVE_ = false>
struct GemmTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_, PAD = 8;
  static constexpr bool ONE_WAVE = ONE_WAVE_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = kWarps / WARPS_M_;
  static constexpr bool B_KMAJOR = B_KMAJOR_;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int A_STRIDE = BK + PAD;  // padding keeps ldmatrix rows on distinct banks
  static constexpr int B_ROWS = B_KMAJOR ? BK : BN;
  static constexpr int B_STRIDE = (B_KMAJOR ? BN : BK) + PAD;
  static constexpr int A_STAGE = BM * A_STRIDE, B_STAGE = B_ROWS * B_STRIDE;
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * int(sizeof(T));
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must hold whole 16x16 fragments");
  static_assert((BM * BK / 8) % kThreads == 0 || BM * BK / 8 < kThreads, "A tile chunks");

  static __host__ __device__ int tiles(const GemmShape& g) {
    return ceil_div(g.M, BM) * ceil_div(g.N, BN) * g.batch;
  }
  static __host__ __device__ int splits(const GemmShape& g) { return splitk_splits(g, tiles(g), BK, ONE_WAVE); }
  // Work items: output tiles times K splits.
  static __host__ __device__ int work(const GemmShape& g) { return tiles(g) * splits(g); }
};

template <class Cfg, class T, class ALoader, class Epi>
__device__ void gemm_run(const GemmShape& g, const ALoader& A, const MatB<T>& B, const Epi& epi, char* smem,
                         const SplitK& sk) {
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + Cfg::STAGES * Cfg::A_STAGE;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int tiles_m = ceil_div(g.M, Cfg::BM), tiles_n = ceil_div(g.N, Cfg::BN);
  const int per_batch = tiles_m * tiles_n;
  const int all_k_tiles = ceil_div(g.K, Cfg::BK);
  const int splits = Cfg::splits(g);
  const int k_per_split = ceil_div(all_k_tiles, splits);
  __shared__ bool last_arrival;

  for (int item = blockIdx.x; item < per_batch * g.batch * splits; item += gridDim.x) {
    const int tile = item / splits, split = item % splits;
    const int kt_begin = split * k_per_split;
    const int k_tiles = max(0, min(all_k_tiles - kt_begin, k_per_split));
    const int b = tile / per_batch, rest = tile % per_batch;
    // N varies fastest so that blocks running together share the rows of A.
    const int m0 = (rest / tiles_n) * Cfg::BM, n0 = (rest % tiles_n) * Cfg::BN;

    auto load_stage = [&](int stage, int kt) {
      const int k0 = (kt_begin + kt) * Cfg::BK;
      T* a = sA + stage * Cfg::A_STAGE;
      for (int c = threadIdx.x; c < Cfg::BM * Cfg::BK / 8; c += kThreads) {
        const int row = c / (Cfg::BK / 8), kc = (c % (Cfg::BK / 8)) * 8;
        const bool ok = m0 + row < g.M && k0 + kc < g.K;
        cp_async16(a + row * Cfg::A_STRIDE + kc, ok ? A.chunk(b, m0 + row, k0 + kc) : A.chunk(0, 0, 0), ok);
      }
      T* bs = sB + stage * Cfg::B_STAGE;
      const T* bbase = B.base + b * B.batch_stride;
      if constexpr (Cfg::B_KMAJOR) {
        for (int c = threadIdx.x; c < Cfg::BK * Cfg::BN / 8; c += kThreads) {
          const int kr = c / (Cfg::BN / 8), nc = (c % (Cfg::BN / 8)) * 8;
          const bool ok = k0 + kr < g.K && n0 + nc < g.N;
          cp_async16(bs + kr * Cfg::B_STRIDE + nc, ok ? bbase + (k0 + kr) * B.ld + n0 + nc : B.base, ok);
        }
      } else {
        for (int c = threadIdx.x; c < Cfg::BN * Cfg::BK / 8; c += kThreads) {
          const int nr = c / (Cfg::BK / 8), kc = (c % (Cfg::BK / 8)) * 8;
          const bool ok = n0 + nr < g.N && k0 + kc < g.K;
          cp_async16(bs + nr * Cfg::B_STRIDE + kc, ok ? bbase + (n0 + nr) * B.ld + k0 + kc : B.base, ok);
        }
      }
    };

    float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
    for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

#pragma unroll
    for (int s = 0; s < Cfg::STAGES - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<Cfg::STAGES - 2>();
      __syncthreads();  // stage kt landed for everyone; stage kt-1 is free to refill
      const int next = kt + Cfg::STAGES - 1;
      if (next < k_tiles) load_stage(next % Cfg::STAGES, next);
      cp_async_commit();

      const T* a = sA + (kt % Cfg::STAGES) * Cfg::A_STAGE;
      const T* bs = sB + (kt % Cfg::STAGES) * Cfg::B_STAGE;
#pragma unroll
      for (int kk = 0; kk < Cfg::BK / 16; ++kk) {
        uint32_t af[Cfg::MI][4], bf[Cfg::NI][2];
#pragma unroll
        for (int mi = 0; mi < Cfg::MI; ++mi) {
          const int row = wm * Cfg::WM + mi * 16 + (lane % 16);
          ldmatrix_x4(af[mi], a + row * Cfg::A_STRIDE + kk * 16 + (lane / 16) * 8);
        }
#pragma unroll
        for (int nj = 0; nj < Cfg::NI / 2; ++nj) {
          uint32_t r[4];
          if constexpr (Cfg::B_KMAJOR) {
            const int k = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
            const int n = wn * Cfg::WN + nj * 16 + (lane / 16) * 8;
            ldmatrix_x4_trans(r, bs + k * Cfg::B_STRIDE + n);
          } else {
            const int n = wn * Cfg::WN + nj * 16 + (lane % 8) + (lane / 16) * 8;
            const int k = kk * 16 + ((lane / 8) % 2) * 8;
            ldmatrix_x4(r, bs + n * Cfg::B_STRIDE + k);
          }
          bf[2 * nj][0] = r[0]; bf[2 * nj][1] = r[1];
          bf[2 * nj + 1][0] = r[2]; bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < Cfg::NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue reuses this shared memory

    if (splits > 1) {
      // Partials are stored in fragment order, so each thread later reads back exactly what it owns.
      constexpr int kFrag = Cfg::MI * Cfg::NI * 4;
      float* mine = sk.partials + (static_cast<long long>(tile) * splits + split) * kFrag * kThreads;
#pragma unroll
      for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) __stcg(mine + ((i * Cfg::NI + j) * 4 + r) * kThreads + threadIdx.x, acc[i][j][r]);
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) last_arrival = atomicAdd(sk.counters + tile, 1u) == static_cast<unsigned>(splits - 1);
      __syncthreads();
      if (!last_arrival) continue;
      __threadfence();
      // Sum every split from memory in split order, so the result does not depend on which block came last.
      // The fix-up is bound by L2 latency: small tiles read a group of splits before adding them up.
      constexpr int kGroup = kFrag >= 32 ? 1 : 32 / kFrag;
#pragma unroll
      for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
      for (int first = 0; first < splits; first += kGroup) {
        float part[kGroup][Cfg::MI][Cfg::NI][4];
#pragma unroll
        for (int s = 0; s < kGroup; ++s) {
          const int other = first + s < splits ? first + s : first;  // past the end: re-read, never added
          const float* src = sk.partials + (static_cast<long long>(tile) * splits + other) * kFrag * kThreads;
#pragma unroll
          for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
              for (int r = 0; r < 4; ++r) part[s][i][j][r] = __ldcg(src + ((i * Cfg::NI + j) * 4 + r) * kThreads + threadIdx.x);
        }
#pragma unroll
        for (int s = 0; s < kGroup; ++s) {
          if (first + s >= splits) continue;
#pragma unroll
          for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
              for (int r = 0; r < 4; ++r) acc[i][j][r] += part[s][i][j][r];
        }
      }
      if (threadIdx.x == 0) sk.counters[tile] = 0;  // ready for the next GEMM that uses this scratch
    }

#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi) {
      const int row = m0 + wm * Cfg::WM + mi * 16 + lane / 4;
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni) {
        const int col = n0 + wn * Cfg::WN + ni * 8 + (lane % 4) * 2;
        if (col >= g.N) continue;
        if (row < g.M) epi(b, row, col, acc[mi][ni][0], acc[mi][ni][1]);
        if (row + 8 < g.M) epi(b, row + 8, col, acc[mi][ni][2], acc[mi][ni][3]);
      }
    }
  }
}

}  // namespace fs
