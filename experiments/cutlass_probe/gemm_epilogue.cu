// Torch binding of the CUTLASS probe GEMMs (gemm_epilogue.cuh) for experiments/cutlass_probe.py.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "gemm_epilogue.cuh"

namespace {
void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kHalf && t.is_contiguous(), name,
              " must be a contiguous float16 CUDA tensor");
}

template <class FusionOp>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor* bias,
                  const torch::Tensor* residual) {
  check(x, "x");
  check(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] must share K");
  const int M = x.size(0), N = w.size(0), K = x.size(1);
  TORCH_CHECK(K % probe::kAlign == 0 && N % probe::kAlign == 0, "K and N must be multiples of ", probe::kAlign);
  if (bias) {
    check(*bias, "bias");
    TORCH_CHECK(bias->numel() == N, "bias must hold N = ", N, " values");
  }
  if (residual) {
    check(*residual, "residual");
    TORCH_CHECK(residual->size(0) == M && residual->size(1) == N, "residual must be [M, N]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({M, N}, x.options());
  auto workspace = torch::empty({static_cast<long>(probe::workspace_bytes<FusionOp>(M, N, K))},
                                x.options().dtype(torch::kUInt8));
  const probe::Launch result = probe::launch<FusionOp>(
      M, N, K, x.data_ptr(), w.data_ptr(), bias ? bias->data_ptr() : nullptr,
      residual ? residual->data_ptr() : nullptr, y.data_ptr(), workspace.data_ptr(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(result.error == nullptr, result.error);
  return y;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", [](torch::Tensor x, torch::Tensor w) { return run<probe::Plain>(x, w, nullptr, nullptr); },
        "y = x·Wᵀ");
  m.def("linear_bias_gelu",
        [](torch::Tensor x, torch::Tensor w, torch::Tensor b) { return run<probe::BiasGelu>(x, w, &b, nullptr); },
        "y = GELU(x·Wᵀ + b), erf GELU");
  m.def("linear_bias_residual",
        [](torch::Tensor x, torch::Tensor w, torch::Tensor b, torch::Tensor r) {
          return run<probe::Bias>(x, w, &b, &r);
        },
        "y = x·Wᵀ + b + r");
}
