// Hopper GEMMs with fused epilogues through CUTLASS 3.x: TMA loads, warpgroup MMA and a warp-specialized
// persistent schedule, which our mma.sync GEMM (fs_gemm.cuh) cannot match at many rows. y = x·Wᵀ, then
// + bias (+ residual) or GELU(· + bias), for x [M, K] row-major and W [N, K] as nn.Linear stores it (a K-major B
// operand). Needs sm_90a. experiments/cutlass_probe.py measures the configurations against cuBLAS.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "fs_args.h"
#include "fs_common.cuh"
#include "fs_sm90.cuh"

namespace fs::sm90 {
using namespace cute;

using Acc = float;
using LayoutX = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;  // W [N, K] row-major is B [K, N] column-major
using LayoutY = cutlass::layout::RowMajor;

// Cooperative: both consumer warpgroups share one tile. Pingpong: each owns a tile and its epilogue overlaps the
// other's mainloop. Stream-K splits the K loop of the last wave's tiles across idle SMs.
struct Cooperative {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
struct Pingpong {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};

template <class Tile, class Cluster, class Schedule, class Scheduler = cutlass::gemm::PersistentScheduler,
          class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct Config {
  using TileShape = Tile;
  using EpilogueTile = EpiTile;
  using ClusterShape = Cluster;
  using KernelSchedule = typename Schedule::Kernel;
  using EpilogueSchedule = typename Schedule::Epilogue;
  using TileScheduler = Scheduler;
};

// CUTLASS activation functor for fs::gelu_erf_fast (CUTLASS's own GELU calls erff), element-wise on fragments.
template <class T> struct GeluErfFast {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& value) const {
#if defined(__CUDA_ARCH__)
    return T(gelu_erf_fast(static_cast<float>(value)));
#else
    const float x = static_cast<float>(value);
    return T(0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)));
#endif
  }
};
template <class T, int N> struct GeluErfFast<cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& values) const {
    cutlass::Array<T, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = GeluErfFast<T>{}(values[i]);
    return out;
  }
};

// The epilogues, for storage type E: y = acc; y = acc + bias + beta·C; y = GELU(acc + bias) with CUTLASS's erff
// or with gelu_erf_fast.
template <class E> using Plain = cutlass::epilogue::fusion::LinearCombination<E, Acc, E, Acc>;
template <class E> using BiasAdd =
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Identity, E, Acc, E, E, Acc>;
template <class E> using BiasGelu =
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::GELU, E, Acc, E, E, Acc>;
template <class E> using BiasGeluFast = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<GeluErfFast, E, Acc, E, E, Acc>;

// y = gelu_erf_fast(acc + bias) with no source tensor C. LinCombPerColBiasEltAct computes beta·C + (alpha·acc + bias)
// for every element, C converted from storage even when beta = 0; in FFN1 + GELU that work runs on the epilogue's
// critical path. The marker is resolved per tile shape (the bias broadcast needs it) by Fusion below.
template <class E> struct BiasGeluLean {};

template <class FusionOp, class Tile> struct Fusion {
  using Callbacks = FusionOp;
  template <class E> using SourceElement = E;
};
template <class E, class Tile> struct Fusion<BiasGeluLean<E>, Tile> {
  using Callbacks = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<GeluErfFast, E, Acc, cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Acc, Acc, cutlass::FloatRoundStyle::round_to_nearest>,
          cutlass::epilogue::fusion::Sm90AccFetch,
          cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, E, Acc, Stride<_0, _1, int64_t>,
                                                      128 / cutlass::sizeof_bits<E>::value>>>;
  template <class> using SourceElement = void;  // no C: no source loads, no C in shared memory
};

template <class E, class Cfg, class FusionOp> struct Gemm {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<E>::value;  // 16-byte TMA rows
  using Fused = Fusion<FusionOp, typename Cfg::TileShape>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::TileShape, typename Cfg::ClusterShape,
      typename Cfg::EpilogueTile, Acc, Acc, typename Fused::template SourceElement<E>, LayoutY,
      kAlign, E, LayoutY, kAlign, typename Cfg::EpilogueSchedule, typename Fused::Callbacks>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, LayoutX, kAlign, E, LayoutW, kAlign, Acc,
      typename Cfg::TileShape, typename Cfg::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      typename Cfg::TileScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// y[M, N] = x[M, K]·W[N, K]ᵀ with the epilogue's bias [N] and residual [M, N] (CUTLASS's C, read when given).
struct Problem {
  int M, N, K;
  const void* x;
  const void* w;
  const void* bias;
  const void* residual;
  void* y;
};

// Tile order: raster 0 = CUTLASS's heuristic, 1 = along M, 2 = along N; swizzle groups 1, 2, 4 or 8 tiles.
struct Options {
  int raster = 0;
  int swizzle = 1;
};

template <class E, class Cfg, class FusionOp>
typename Gemm<E, Cfg, FusionOp>::Device::Arguments arguments(const Problem& p, Options options) {
  using Kernel = typename Gemm<E, Cfg, FusionOp>::Device::GemmKernel;
  auto stride_x = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(p.M, p.K, 1));
  auto stride_w = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(p.N, p.K, 1));
  auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(p.M, p.N, 1));
  const E* c = static_cast<const E*>(p.residual ? p.residual : p.y);
  typename Gemm<E, Cfg, FusionOp>::Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.M, p.N, p.K, 1},
      {static_cast<const E*>(p.x), stride_x, static_cast<const E*>(p.w), stride_w},
      {{}, c, stride_y, static_cast<E*>(p.y), stride_y}};
  if constexpr (std::is_same_v<FusionOp, BiasGeluLean<E>>) {
    args.epilogue.thread = {{{}, {static_cast<const E*>(p.bias), E(0), {}}, {}}, {}};  // ((acc, bias, +), GELU)
  } else {
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = p.residual ? 1.f : 0.f;
    if constexpr (!std::is_same_v<FusionOp, Plain<E>>) args.epilogue.thread.bias_ptr = static_cast<const E*>(p.bias);
  }
  using Raster = typename Kernel::TileScheduler::RasterOrderOptions;
  args.scheduler.raster_order = options.raster == 1 ? Raster::AlongM : options.raster == 2 ? Raster::AlongN
                                                                                              : Raster::Heuristic;
  args.scheduler.max_swizzle_size = options.swizzle;
  return args;
}

template <class E, class Cfg, class FusionOp> size_t workspace_bytes(const Problem& p, Options options) {
  return Gemm<E, Cfg, FusionOp>::Device::get_workspace_size(arguments<E, Cfg, FusionOp>(p, options));
}

enum class Outcome { kLaunched, kUnsupported, kInitializeFailed, kLaunchFailed };

// Launch on `stream` with `workspace` (workspace_bytes of it). kUnsupported: CUTLASS cannot run this problem
// (alignment, shape), nothing was launched.
template <class E, class Cfg, class FusionOp>
Outcome launch(const Problem& p, Options options, void* workspace, cudaStream_t stream) {
  typename Gemm<E, Cfg, FusionOp>::Device gemm;
  auto args = arguments<E, Cfg, FusionOp>(p, options);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return Outcome::kUnsupported;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return Outcome::kInitializeFailed;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return Outcome::kLaunchFailed;
  return Outcome::kLaunched;
}

// --- The layer's GEMM + epilogue segments (operators 7–8, 10–11, 12–13) ---

// From this many rows on, the segment runs here. Fewer rows go to the segment's resident-weight kernel
// (fs::kResidentMaxRows, fs_gemm_resident.cuh), which keeps the weights in shared memory.
constexpr int kMinRows = 65;

// The configuration per GEMM + epilogue and row range, from experiments/cutlass_probe.py (H100,
// experiments/results/cutlass-probe-h100.md):
// - from kManyRows on, the fastest at 4096–32768 rows: 128×256 cooperative tiles on a 2×1 cluster for FFN1 +
//   GELU (below kPingpongRows, see PingpongFfn1Config), 128×128 pingpong tiles for the two N = hidden GEMMs + bias
//   + residual;
// - below kManyRows, tiles sized so that 1024–2048 rows make about one wave of 132 SMs: 128×192 cooperative tiles
//   on a 2×1 cluster for FFN1 + GELU (128 tiles at 1024 rows), and for the N = hidden GEMMs 128×96 cooperative
//   tiles from kFewRows (128 tiles at 2048 rows) or 64×96 pingpong tiles below it (128 tiles at 1024 rows);
// - below kSomeRows, 64×64 pingpong tiles for all three, the fastest at 32 and 128 rows, where the GEMM streams its
//   weights: 96–576 tiles at 128 rows.
constexpr int kSomeRows = 1024;
constexpr int kFewRows = 2048;
constexpr int kManyRows = 4096;
template <int OP> using SegmentConfig = std::conditional_t<
    OP == 10, Config<Shape<_128, _256, _64>, Shape<_2, _1, _1>, Cooperative>,
    Config<Shape<_128, _128, _64>, Shape<_1, _1, _1>, Pingpong>>;
template <int OP> using FewRowSegmentConfig = std::conditional_t<
    OP == 10, Config<Shape<_128, _192, _64>, Shape<_2, _1, _1>, Cooperative>,
    Config<Shape<_128, _96, _64>, Shape<_1, _1, _1>, Cooperative>>;
template <int OP> using FewerRowSegmentConfig = std::conditional_t<
    OP == 10, FewRowSegmentConfig<OP>, Config<Shape<_64, _96, _64>, Shape<_1, _1, _1>, Pingpong>>;
using SomeRowSegmentConfig = Config<Shape<_64, _64, _64>, Shape<_1, _1, _1>, Pingpong>;
// FFN1 + GELU from kPingpongRows rows: pingpong 128×128 tiles, whose GELU epilogue runs under the other warp
// group's main loop. Alone at 32768 rows: 277.5 against 285.8 µs for the cooperative tiles on an H100
// (experiments/results/ffn1-tiles-h100/), 276.5 against 297.7 on an H200 (experiments/NOTES.md). The 64×64
// epilogue tile, in place of CUTLASS's 64×32, halves the sub-tile rounds and doubles the independent elements of
// each: with the lean GELU epilogue 260 against 268 µs for CUTLASS's tile, alone at 64×512 fp16 on an H100
// (experiments/results/ffn1-lean-epilogue-h100/).
using PingpongFfn1Config =
    Config<Shape<_128, _128, _64>, Shape<_1, _1, _1>, Pingpong, cutlass::gemm::PersistentScheduler, Shape<_64, _64>>;
constexpr int kPingpongRows = 8192;

__host__ __device__ constexpr bool has_segment_gemm(int op) { return op == 7 || op == 10 || op == 12; }

// Launch one segment configuration as a CUDA error code (cudaErrorNotSupported: nothing was launched).
template <class E, class Cfg, class FusionOp> cudaError_t launch_segment_gemm(const Problem& p, cudaStream_t stream) {
  // The persistent scheduler needs no workspace; a configuration that does would need the binding to allocate it.
  if (workspace_bytes<E, Cfg, FusionOp>(p, {}) != 0) return cudaErrorInvalidConfiguration;
  switch (launch<E, Cfg, FusionOp>(p, {}, nullptr, stream)) {
    case Outcome::kLaunched: return cudaGetLastError();
    case Outcome::kUnsupported: return cudaErrorNotSupported;
    default: {
      const cudaError_t error = cudaGetLastError();
      return error != cudaSuccess ? error : cudaErrorLaunchFailure;
    }
  }
}

// Operator OP (7, 10 or 12) with the next operator as its epilogue, on fs::LayerArgs buffers.
// cudaErrorNotSupported: not an sm_90 GPU, or CUTLASS cannot run this problem; nothing was launched and the
// caller runs its own kernel.
template <class T, class D, int OP> cudaError_t segment_gemm(const LayerArgs& a, cudaStream_t stream) {
  static_assert(has_segment_gemm(OP), "only out_gemm, ffn1_gemm and ffn2_gemm have a CUTLASS segment");
  if (!on_sm90()) return cudaErrorNotSupported;
  using E = typename CutlassType<T>::type;
  using FusionOp = std::conditional_t<OP == 10, BiasGeluLean<E>, BiasAdd<E>>;
  const Problem p{a.batch * a.seq,
                  OP == 10 ? D::ffn : D::hidden,
                  OP == 12 ? D::ffn : D::hidden,
                  OP == 7 ? a.ctx : OP == 10 ? a.attn_out : a.ffn_act,
                  OP == 7 ? a.w_o : OP == 10 ? a.w_ffn1 : a.w_ffn2,
                  OP == 7 ? a.b_o : OP == 10 ? a.b_ffn1 : a.b_ffn2,
                  OP == 7 ? a.x : OP == 10 ? nullptr : a.attn_out,
                  OP == 7 ? a.attn_res : OP == 10 ? a.ffn_act : a.ffn_res};
  if constexpr (OP == 10) {
    if (p.M >= kPingpongRows) return launch_segment_gemm<E, PingpongFfn1Config, FusionOp>(p, stream);
  }
  if (p.M >= kManyRows) return launch_segment_gemm<E, SegmentConfig<OP>, FusionOp>(p, stream);
  if (p.M < kSomeRows) return launch_segment_gemm<E, SomeRowSegmentConfig, FusionOp>(p, stream);
  if constexpr (!std::is_same_v<FewerRowSegmentConfig<OP>, FewRowSegmentConfig<OP>>) {
    if (p.M < kFewRows) return launch_segment_gemm<E, FewerRowSegmentConfig<OP>, FusionOp>(p, stream);
  }
  return launch_segment_gemm<E, FewRowSegmentConfig<OP>, FusionOp>(p, stream);
}

}  // namespace fs::sm90
