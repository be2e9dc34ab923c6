// Layer GEMMs whose weights sit in shared memory for a whole segment kernel, for few rows on sm_90.
//
// At a few dozen rows a layer is bound by streaming 14 MB of weights and by the latency of each dependent step,
// not by math. So a persistent segment kernel deals every block a fixed slice of each weight matrix it multiplies
// and starts all those copies (bulk async copies, one mbarrier per GEMM) before its first stage. The weight stream
// then runs under the stages and grid barriers before each GEMM, and a GEMM stage reads only activations.
//
// A block's slice of an [N, K] weight is a run of 8-column groups over one K split. Its 8 warps divide the split's
// K range; their sums meet in shared memory in warp order, and K splits across blocks meet in the split-K scratch,
// added in split order by the last block to arrive, so results are bit-reproducible.
#pragma once
#include <type_traits>

#include "fs_gemm.cuh"

namespace fs {

// Rows up to which a segment launches its resident-weight kernel. Every block reads all rows of A for its slice,
// one group of 32 rows after the other, so the time grows with M: at 128 rows the whole layer took 68 µs against
// 34 at 32 (H100), where tiled kernels and cuBLAS take 40.
constexpr int kResidentMaxRows = 64;
constexpr int kResidentSplitDepth = 768;  // K elements a block's slice spans at most: K = 3072 splits four ways
// The output GEMM (N = K = 768) splits K too: unsplit, only 96 of 132 blocks hold a slice and each reads all of A,
// which is most of a stage at 32 rows; split, every block reads a quarter of A's row and the LayerNorm after the
// grid barrier adds the splits (schedule.resident_weight_stages).
constexpr int kResidentOutSplits = 4;

// K splits of resident GEMM OP: the output GEMM's kResidentOutSplits, halved until each split is a whole number of
// 32-deep chunks; the others the fewest that keep a split within kResidentSplitDepth and whole chunks (eight for
// K = 4096, as in BERT-large's FFN2). Where none does (K not a multiple of 32), kWidthsSplit is false.
constexpr int resident_splits(int op, int k) {
  if (op == 7) {
    int splits = kResidentOutSplits;
    while (splits > 1 && k % (splits * 32) != 0) splits /= 2;
    return splits;
  }
  for (int splits = ceil_div(k, kResidentSplitDepth); splits * 32 <= k; ++splits)
    if (k % (splits * 32) == 0) return splits;
  return ceil_div(k, kResidentSplitDepth);
}
constexpr int kResidentMaxN8 = 4;         // 8-column groups of one GEMM a block may hold (the launch checks)
constexpr int kResidentRowGroup = 32;     // rows per pass: two m16 tiles per warp
constexpr int kResidentScratchStride = kResidentMaxN8 * 8 + 8;  // floats per row of a warp's sums (+8: banks)
constexpr int kResidentScratchBytes = kWarps * kResidentRowGroup * kResidentScratchStride * 4;

// The [N, K] weight (nn.Linear layout) of layer GEMM OP, as resident slices.
template <class D, int OP> struct ResidentGemm {
  static_assert(OP == 0 || OP == 7 || OP == 10 || OP == 12, "only the layer GEMMs have weights");
  static constexpr int N = OP == 0 ? 3 * D::hidden : OP == 10 ? D::ffn : D::hidden;
  static constexpr int K = OP == 12 ? D::ffn : D::hidden;
  static constexpr int N8 = N / 8;
  static constexpr int SPLITS = resident_splits(OP, K);
  static constexpr int KS = K / SPLITS;  // K elements of one split
  static constexpr int CHUNKS = KS / 32;
  static constexpr int CHUNKS_PER_WARP = ceil_div(CHUNKS, kWarps);
  // Rows are stored unpadded, so a slice of the whole K is one contiguous copy. The weight fragments then meet a
  // 2-way bank conflict (a quarter warp reads 64 bytes from each of two rows), which is cheap: each is read once.
  static constexpr int ROW_BYTES = KS * 2;
  // Slices are 8-column groups of 32-deep chunks; widths that do not divide so (an intermediate size of 1000, say)
  // leave the segment to its tiled kernel: the resident one is compiled but never launched (fits).
  static constexpr bool kWidthsSplit = N % 8 == 0 && K % (SPLITS * 32) == 0;

  // Column partitions for a grid of `grid` blocks: each is SPLITS units (one per K split), at most one per block.
  static __host__ __device__ constexpr int parts(int grid) { return grid / SPLITS < N8 ? grid / SPLITS : N8; }
  static __host__ __device__ constexpr int units(int grid) { return SPLITS * parts(grid); }
  static __host__ __device__ bool fits(int grid) {
    return kWidthsSplit && parts(grid) > 0 && ceil_div(N8, parts(grid)) <= kResidentMaxN8;
  }
};

// One block's slice of one resident GEMM.
struct ResidentSlice {
  int part = -1;  // column partition; -1: the block holds none of this GEMM
  int split = 0;  // K split
  int n0 = 0;     // first column
  int n8 = 0;     // 8-column groups
  int offset = 0; // bytes from the start of the block's weight region
  int bytes = 0;  // shared-memory bytes of the slice (rows unpadded)
};

// Units are dealt round-robin over the grid, each GEMM continuing where the previous one stopped, so every block
// holds a similar share of all the weights.
template <class D, int OP> __host__ __device__ constexpr ResidentSlice resident_slice(int block, int grid, int dealt) {
  using G = ResidentGemm<D, OP>;
  ResidentSlice s;
  const int unit = ((block - dealt % grid) % grid + grid) % grid;
  if (unit >= G::units(grid)) return s;
  const int parts = G::parts(grid);
  s.part = unit / G::SPLITS;
  s.split = unit % G::SPLITS;
  const int first = s.part * G::N8 / parts, end = (s.part + 1) * G::N8 / parts;
  s.n0 = first * 8;
  s.n8 = end - first;
  s.bytes = s.n8 * 8 * G::ROW_BYTES;
  return s;
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_expect_bytes(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, int parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  }
}
// Global → shared copy by the bulk-copy engine; completion counts bytes on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

// Grid size of the slice tables worked out at compile time: the SMs of an H100 SXM and of an H200.
constexpr int kResidentTableGrid = 132;
// The slices of every block of a kResidentTableGrid grid for ResidentWeights W (W::table()), in constant memory.
template <class W> __constant__ typename W::Table kResidentSlices = W::table();

// No resident weights: every GEMM stage runs the tiled GEMM.
struct NoResidentWeights {
  template <int OP> static constexpr bool holds() { return false; }
};

// The resident weights of one segment kernel: GEMM operators OPS in stage order. Dynamic shared memory holds the
// stages' scratch (SCRATCH bytes), then one mbarrier per GEMM, the table of the block's slices, each GEMM's weight
// pointer, then the slices.
template <class T, class D, int SCRATCH, int... OPS> struct ResidentWeights {
  static_assert(sizeof(T) == 2, "resident weights are 16-bit");
  static_assert(SCRATCH >= kResidentScratchBytes, "the stage scratch must hold the resident GEMM's warp sums");
  static constexpr int kSlots = sizeof...(OPS);
  static constexpr int kBarrierOffset = ceil_div(SCRATCH, 128) * 128;
  // The block's slices, copied from the compile-time table on a kResidentTableGrid grid, else worked out when the
  // kernel starts (each takes integer divisions by the grid size).
  static constexpr int kSliceOffset = kBarrierOffset + kSlots * 8;
  static constexpr int kTableBytes = kSlots * static_cast<int>(sizeof(ResidentSlice));
  static constexpr int kSourceOffset = ceil_div(kSliceOffset + kTableBytes, 8) * 8;
  static constexpr int kWeightOffset = ceil_div(kSourceOffset + kSlots * 8, 128) * 128;

  template <int OP> static constexpr bool holds() { return ((OPS == OP) || ...); }
  template <int OP> static constexpr int slot() {
    int index = 0, found = -1;
    ((found = OPS == OP ? index : found, ++index), ...);
    return found;
  }

  // Block `block`'s slices of a grid of `grid` blocks, in slot order; returns the bytes they take.
  static __host__ __device__ constexpr int slices(int block, int grid, ResidentSlice (&out)[kSlots]) {
    int dealt = 0, offset = 0, index = 0;
    ((out[index++] = visit<OPS>(block, grid, dealt, offset)), ...);
    return offset;
  }
  template <int OP> static __host__ __device__ ResidentSlice slice(int block, int grid) {
    ResidentSlice all[kSlots];
    slices(block, grid, all);
    return all[slot<OP>()];
  }
  static __host__ __device__ int weight_bytes(int block, int grid) {
    ResidentSlice all[kSlots];
    return slices(block, grid, all);
  }
  struct Table {
    ResidentSlice slices[kResidentTableGrid][kSlots];
  };
  static constexpr Table table() {
    Table t{};
    for (int block = 0; block < kResidentTableGrid; ++block) slices(block, kResidentTableGrid, t.slices[block]);
    return t;
  }
  // Dynamic shared memory a block needs on a grid of `grid` blocks; 0 where some GEMM cannot be dealt.
  static int smem_bytes(int grid) {
    if (!(ResidentGemm<D, OPS>::fits(grid) && ...)) return 0;
    int most = 0;
    for (int block = 0; block < grid; ++block) most = max_of(most, weight_bytes(block, grid));
    return kWeightOffset + most;
  }
  // Bulk copies need 16-byte aligned sources.
  static bool aligned(const LayerArgs& a) {
    return (aligned16(weight_of<OPS>(a)) && ...);
  }

  static __device__ uint64_t* barrier(char* smem, int slot) {
    return reinterpret_cast<uint64_t*>(smem + kBarrierOffset) + slot;
  }
  static __device__ const char* weights(const char* smem) { return smem + kWeightOffset; }
  // This block's slice of GEMM OP, from the table start() wrote.
  template <int OP> static __device__ ResidentSlice held(const char* smem) {
    return reinterpret_cast<const ResidentSlice*>(smem + kSliceOffset)[slot<OP>()];
  }

  // Start the first GEMM's weight copies of this block; called by the whole block before its first stage. A bulk
  // copy takes its operands from uniform registers, so a warp issues them one at a time: the copies are dealt over
  // the warps, and a slice of the whole K is one copy. Issuing a copy stalls the issuing thread until the copy
  // engine takes it, which it does only as the copies before it stream in: issuing every GEMM's copies here held
  // each warp about 1.5 µs (H100, 1×32) before the first GEMM could begin. So the later GEMMs' copies go out from
  // inside the first GEMM, once its loads of A are in flight (issue_later), where the stall overlaps their latency;
  // a block without a slice of the first GEMM issues them here. The slices come from the compile-time table where
  // the grid matches it: working them out took most of the start's code, which every SM fetches from L2 before
  // its first copy can begin.
  static __device__ void start(const LayerArgs& a, char* smem) {
    if (threadIdx.x == 0) {
      for (int s = 0; s < kSlots; ++s) mbarrier_init(barrier(smem, s), 1);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
      ResidentSlice* held = reinterpret_cast<ResidentSlice*>(smem + kSliceOffset);
      if (gridDim.x == kResidentTableGrid) {
        for (int s = 0; s < kSlots; ++s) held[s] = kResidentSlices<ResidentWeights>.slices[blockIdx.x][s];
      } else {
        ResidentSlice all[kSlots];
        slices(blockIdx.x, gridDim.x, all);
        for (int s = 0; s < kSlots; ++s) held[s] = all[s];
      }
      // A block without a slice never waits on its barrier.
      for (int s = 0; s < kSlots; ++s)
        if (held[s].part >= 0) mbarrier_expect_bytes(barrier(smem, s), held[s].bytes);
      const void** sources = reinterpret_cast<const void**>(smem + kSourceOffset);
      int index = 0;
      ((sources[index++] = weight_of<OPS>(a)), ...);
    }
    __syncthreads();  // barriers armed, slices and sources known before any copy can complete
    if (threadIdx.x % 32 == 0) {
      issue<first_op<OPS...>()>(smem);
      if (held<first_op<OPS...>()>(smem).part < 0) issue_later(smem);
    }
  }
  // Lane 0 of every warp: the copies of every GEMM after the first. The first GEMM calls it under its first loads
  // of A (see start).
  static __device__ void issue_later(char* smem) { issue_rest<OPS...>(smem); }

 private:
  template <int FIRST, int... REST> static constexpr int first_op() { return FIRST; }
  template <int FIRST, int... REST> static __device__ void issue_rest(char* smem) { (issue<REST>(smem), ...); }
  static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
  template <int OP> static __host__ __device__ const void* weight_of(const LayerArgs& a) {
    return OP == 0 ? a.w_qkv : OP == 7 ? a.w_o : OP == 10 ? a.w_ffn1 : a.w_ffn2;
  }
  // GEMM OP's slice, placed after the slices dealt before it (`dealt` units, `offset` bytes), which it advances.
  template <int OP> static __host__ __device__ constexpr ResidentSlice visit(int block, int grid, int& dealt, int& offset) {
    ResidentSlice s = resident_slice<D, OP>(block, grid, dealt);
    s.offset = offset;
    offset += s.bytes;
    dealt += ResidentGemm<D, OP>::units(grid);
    return s;
  }
  // Lane 0 of each warp: its share of the copies of GEMM OP's slice (one copy, or one per row when K is split).
  template <int OP> static __device__ void issue(char* smem) {
    using G = ResidentGemm<D, OP>;
    const ResidentSlice s = held<OP>(smem);
    if (s.part < 0) return;
    uint64_t* bar = barrier(smem, slot<OP>());
    const T* source = static_cast<const T*>(reinterpret_cast<const void* const*>(smem + kSourceOffset)[slot<OP>()]);
    const T* w = source + static_cast<long long>(s.n0) * G::K + s.split * G::KS;
    char* dst = smem + kWeightOffset + s.offset;
    const int warp = threadIdx.x / 32, rows = s.n8 * 8;
    if constexpr (G::SPLITS == 1) {
      if (warp == slot<OP>() % kWarps) bulk_copy(dst, w, rows * G::ROW_BYTES, bar);
    } else {
      for (int row = warp; row < rows; row += kWarps)
        bulk_copy(dst + row * G::ROW_BYTES, w + static_cast<long long>(row) * G::K, G::ROW_BYTES, bar);
    }
  }
};

// An epilogue that reads operands of its own (bias, residual) may split into `operands(row, col)` and
// `store(row, col, operands, v0, v1)`: a resident GEMM then reads them before its MMAs, so their round trip to L2
// overlaps the MMAs instead of following the warps' sums. Plain epilogues (a callable) read them when called.
struct NoOperands {};
template <class Epi, class = void> struct EpilogueOperands {
  using type = NoOperands;
  static constexpr bool kEarly = false;
};
template <class Epi> struct EpilogueOperands<Epi, std::void_t<typename Epi::Operands>> {
  using type = typename Epi::Operands;
  static constexpr bool kEarly = true;
};
template <class Epi> __device__ __forceinline__ typename EpilogueOperands<Epi>::type early_operands(const Epi& epi, int row,
                                                                                                   int col) {
  if constexpr (EpilogueOperands<Epi>::kEarly) return epi.operands(row, col);
  else return {};
}
template <class Epi>
__device__ __forceinline__ void finish(const Epi& epi, int row, int col, const typename EpilogueOperands<Epi>::type& ops,
                                       float v0, float v1) {
  if constexpr (EpilogueOperands<Epi>::kEarly) epi.store(row, col, ops, v0, v1);
  else epi(0, row, col, v0, v1);
}

// C = A·Wᵀ for the rows of A against this block's resident slice, then the epilogue, pair by pair. SPLITS_TO_NEXT
// (a GEMM followed by the LayerNorm that adds its splits): each K split, even a lone one where the widths allow no
// more, stores its sums to the split-K scratch as [split][M][N] and the stage after the next grid barrier adds them
// (the epilogue is not run).
//
// Each lane loads 16 bytes of A per row and 32-deep chunk and feeds them to two m16n8k16 MMAs as if they were k
// {2t, 2t+1, 2t+8, 2t+9} of two k16 steps; the weight fragment is read from the same 16 bytes of its row, so A
// and W agree on the permuted k and the product is unchanged. A then needs no shared memory and no ldmatrix.
template <class T, class D, int OP, class Resident, bool SPLITS_TO_NEXT = false, class ALoader, class Epi>
__device__ void resident_gemm(const GemmShape& g, const ALoader& A, const Epi& epi, char* smem, const SplitK& sk) {
  using G = ResidentGemm<D, OP>;
  const ResidentSlice s = Resident::template held<OP>(smem);
  if (s.part < 0) return;
  const char* sw = Resident::weights(smem) + s.offset;
  float* sums = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
  const int k0 = s.split * G::KS, cols = s.n8 * 8, pairs = kResidentRowGroup * cols / 2;
  float* partials = sk.partials + static_cast<long long>(s.part * G::SPLITS + s.split) * g.M * (kResidentMaxN8 * 8);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  using Operands = typename EpilogueOperands<Epi>::type;
  constexpr int kPairsPerThread = ceil_div(kResidentRowGroup * kResidentMaxN8 * 8 / 2, kThreads);
  // The output pairs this thread finishes in a row group: p = threadIdx.x + i·kThreads < pairs.
  auto pair_at = [&](int p, int& row, int& col) {
    row = p / (cols / 2);
    col = (p % (cols / 2)) * 2;
  };

  for (int m0 = 0; m0 < g.M; m0 += kResidentRowGroup) {
    uint4 a_lo[G::CHUNKS_PER_WARP][2], a_hi[G::CHUNKS_PER_WARP][2];
#pragma unroll
    for (int i = 0; i < G::CHUNKS_PER_WARP; ++i) {
      const int chunk = warp + i * kWarps;
      const int k = k0 + chunk * 32 + t * 8;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int row = m0 + mi * 16 + gq;
        const bool in_k = chunk < G::CHUNKS;
        a_lo[i][mi] = in_k && row < g.M ? __ldcg(reinterpret_cast<const uint4*>(A.chunk(0, row, k))) : zero;
        a_hi[i][mi] = in_k && row + 8 < g.M ? __ldcg(reinterpret_cast<const uint4*>(A.chunk(0, row + 8, k))) : zero;
      }
    }
    Operands early[kPairsPerThread];
    if constexpr (G::SPLITS == 1 && !SPLITS_TO_NEXT && EpilogueOperands<Epi>::kEarly) {
#pragma unroll
      for (int i = 0; i < kPairsPerThread; ++i) {
        int r = 0, c = 0;
        pair_at(threadIdx.x + i * kThreads, r, c);
        if (threadIdx.x + i * kThreads < pairs && m0 + r < g.M) early[i] = early_operands(epi, m0 + r, s.n0 + c);
      }
    }
    // The first GEMM's block starts the later GEMMs' copies while its loads of A are in flight (see start).
    if constexpr (Resident::template slot<OP>() == 0)
      if (m0 == 0 && lane == 0) Resident::issue_later(smem);
    mbarrier_wait(Resident::barrier(smem, Resident::template slot<OP>()), 0);  // a completed phase passes at once
    float acc[2][kResidentMaxN8][4] = {};
#pragma unroll
    for (int i = 0; i < G::CHUNKS_PER_WARP; ++i) {
      const int chunk = warp + i * kWarps;
      if (chunk >= G::CHUNKS) continue;
#pragma unroll
      for (int ni = 0; ni < kResidentMaxN8; ++ni) {
        if (ni >= s.n8) continue;
        const uint4 b = *reinterpret_cast<const uint4*>(sw + (ni * 8 + gq) * G::ROW_BYTES + chunk * 64 + t * 16);
        const uint32_t b_first[2] = {b.x, b.y}, b_second[2] = {b.z, b.w};
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const uint32_t a_first[4] = {a_lo[i][mi].x, a_hi[i][mi].x, a_lo[i][mi].y, a_hi[i][mi].y};
          const uint32_t a_second[4] = {a_lo[i][mi].z, a_hi[i][mi].z, a_lo[i][mi].w, a_hi[i][mi].w};
          mma16816<T>(acc[mi][ni], a_first, b_first);
          mma16816<T>(acc[mi][ni], a_second, b_second);
        }
      }
    }
    // Each warp's sums to shared memory, then every output pair adds them up in warp order.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < kResidentMaxN8; ++ni) {
        if (ni >= s.n8) continue;
        float* row = sums + (warp * kResidentRowGroup + mi * 16 + gq) * kResidentScratchStride + ni * 8 + t * 2;
        *reinterpret_cast<float2*>(row) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
        *reinterpret_cast<float2*>(row + 8 * kResidentScratchStride) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
      }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      const int p = threadIdx.x + i * kThreads;
      int r = 0, c = 0;
      pair_at(p, r, c);
      const int row = m0 + r;
      if (p >= pairs || row >= g.M) continue;
      float v0 = 0.f, v1 = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 x = *reinterpret_cast<const float2*>(sums + (w * kResidentRowGroup + r) * kResidentScratchStride + c);
        v0 += x.x;
        v1 += x.y;
      }
      if constexpr (SPLITS_TO_NEXT)
        __stcg(reinterpret_cast<float2*>(sk.partials + (static_cast<long long>(s.split) * g.M + row) * G::N + s.n0 + c),
               make_float2(v0, v1));
      else if constexpr (G::SPLITS == 1) finish(epi, row, s.n0 + c, early[i], v0, v1);
      else __stcg(reinterpret_cast<float2*>(partials + row * (kResidentMaxN8 * 8) + c), make_float2(v0, v1));
    }
    __syncthreads();  // the next row group reuses the sums
  }

  if constexpr (G::SPLITS > 1 && !SPLITS_TO_NEXT) {
    // The last split to arrive adds all of them, in split order, and runs the epilogue.
    // The block barrier orders every thread's partials before thread 0's release; its acquire, and the barrier
    // after it, make the other splits' partials visible to the whole block. Every split reads the epilogue's
    // operands of its first pairs before that, so their round trip overlaps the arrival's.
    constexpr int kFixupEarly = ceil_div(kResidentMaxRows * kResidentMaxN8 * 8 / 2, kThreads);
    Operands fixup_early[kFixupEarly];
    if constexpr (EpilogueOperands<Epi>::kEarly) {
#pragma unroll
      for (int i = 0; i < kFixupEarly; ++i) {
        int row = 0, c = 0;
        pair_at(threadIdx.x + i * kThreads, row, c);
        if (row < g.M) fixup_early[i] = early_operands(epi, row, s.n0 + c);
      }
    }
    __shared__ bool last_arrival;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int before;
      asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;\n" : "=r"(before) : "l"(sk.counters + s.part) : "memory");
      last_arrival = before == static_cast<unsigned>(G::SPLITS - 1);
    }
    __syncthreads();
    if (!last_arrival) return;
    const float* first = sk.partials + static_cast<long long>(s.part * G::SPLITS) * g.M * (kResidentMaxN8 * 8);
    const long long split_stride = static_cast<long long>(g.M) * (kResidentMaxN8 * 8);
    auto fix_up = [&](int p, const Operands& ops) {
      int row = 0, c = 0;
      pair_at(p, row, c);
      float2 part[G::SPLITS];
#pragma unroll
      for (int k = 0; k < G::SPLITS; ++k)
        part[k] = __ldcg(reinterpret_cast<const float2*>(first + k * split_stride + row * (kResidentMaxN8 * 8) + c));
      float v0 = 0.f, v1 = 0.f;
#pragma unroll
      for (int k = 0; k < G::SPLITS; ++k) {
        v0 += part[k].x;
        v1 += part[k].y;
      }
      finish(epi, row, s.n0 + c, ops, v0, v1);
    };
    const int total = g.M * cols / 2;
#pragma unroll
    for (int i = 0; i < kFixupEarly; ++i)
      if (threadIdx.x + i * kThreads < total) fix_up(threadIdx.x + i * kThreads, fixup_early[i]);
    for (int p = threadIdx.x + kFixupEarly * kThreads; p < total; p += kThreads) {  // past kResidentMaxRows only
      int row = 0, c = 0;
      pair_at(p, row, c);
      fix_up(p, early_operands(epi, row, s.n0 + c));
    }
    if (threadIdx.x == 0) sk.counters[s.part] = 0;  // ready for the next GEMM that uses this scratch
  }
}

}  // namespace fs
