// Hopper GEMMs with fused epilogues from CUTLASS 3.x (TMA loads, warpgroup MMA, warp-specialized persistent
// schedule), as candidates for the GEMM inside a fused segment: y = x·Wᵀ (+ bias) (+ residual) (then GELU).
// x is [M, K] row-major, W is [N, K] row-major as nn.Linear stores it (a K-major B operand), y is [M, N].
// Plain CUDA: the torch binding lives in gemm_epilogue.cu.
#pragma once
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace probe {
using namespace cute;

using Elem = cutlass::half_t;
using Acc = float;
using LayoutX = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;  // W [N, K] row-major is B [K, N] column-major
using LayoutY = cutlass::layout::RowMajor;
constexpr int kAlign = 128 / cutlass::sizeof_bits<Elem>::value;  // 16-byte accesses

// 128×256 output tiles over two warpgroups of MMA, a 2×1 cluster so TMA multicasts the shared W tile.
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;

template <class FusionOp> struct Gemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, Elem, LayoutY, kAlign, Elem, LayoutY, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, FusionOp>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Elem, LayoutX, kAlign, Elem, LayoutW, kAlign, Acc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using Plain = cutlass::epilogue::fusion::LinearCombination<Elem, Acc, Elem, Acc>;
using BiasGelu = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::GELU, Elem, Acc,
                                                                     Elem, Elem, Acc>;
using Bias = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Identity, Elem, Acc, Elem,
                                                                 Elem, Acc>;

// The outcome of a launch: a readable failure, or nullptr on success.
struct Launch {
  const char* error = nullptr;
};

// y = x·Wᵀ through FusionOp; `bias` (length N) is read unless FusionOp is Plain, `residual` ([M, N]) is added
// with beta = 1 when given (the epilogue reads C only when beta ≠ 0). `workspace` holds workspace_bytes<FusionOp>.
template <class FusionOp> typename Gemm<FusionOp>::Device::Arguments arguments(int M, int N, int K, const void* x,
    const void* w, const void* bias, const void* residual, void* y) {
  using Kernel = typename Gemm<FusionOp>::Device::GemmKernel;
  auto stride_x = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
  auto stride_w = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
  auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(M, N, 1));
  const Elem* c = static_cast<const Elem*>(residual ? residual : y);
  typename Gemm<FusionOp>::Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const Elem*>(x), stride_x, static_cast<const Elem*>(w), stride_w},
      {{}, c, stride_y, static_cast<Elem*>(y), stride_y}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = residual ? 1.f : 0.f;
  if constexpr (!std::is_same_v<FusionOp, Plain>) args.epilogue.thread.bias_ptr = static_cast<const Elem*>(bias);
  return args;
}

template <class FusionOp> size_t workspace_bytes(int M, int N, int K) {
  return Gemm<FusionOp>::Device::get_workspace_size(arguments<FusionOp>(M, N, K, nullptr, nullptr, nullptr, nullptr,
                                                                         nullptr));
}

template <class FusionOp> Launch launch(int M, int N, int K, const void* x, const void* w, const void* bias,
                                       const void* residual, void* y, void* workspace, cudaStream_t stream) {
  typename Gemm<FusionOp>::Device gemm;
  auto args = arguments<FusionOp>(M, N, K, x, w, bias, residual, y);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return {"CUTLASS cannot run this GEMM shape"};
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return {"CUTLASS initialize failed"};
  if (gemm.run(stream) != cutlass::Status::kSuccess) return {"CUTLASS GEMM launch failed"};
  return {};
}
}  // namespace probe
