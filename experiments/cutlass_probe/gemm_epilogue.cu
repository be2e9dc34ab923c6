// Torch binding of the CUTLASS probe GEMMs for experiments/cutlass_probe.py. The configuration units and
// configs.inc (one PROBE_CONFIG(name) line per unit) are written by the script next to the build; this unit
// includes the CUTLASS headers but instantiates no kernel.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "gemm_epilogue.cuh"

#define PROBE_CONFIG(name) PROBE_DECLARE(name)
#include "configs.inc"
#undef PROBE_CONFIG

namespace {
struct Unit {
  const char* name;
  probe::Outcome (*run)(probe::Epilogue, const probe::Problem&, probe::Options, void*, cudaStream_t);
  size_t (*workspace)(probe::Epilogue, const probe::Problem&, probe::Options);
};
const Unit kUnits[] = {
#define PROBE_CONFIG(name) {#name, &probe::run_##name, &probe::workspace_##name},
#include "configs.inc"
#undef PROBE_CONFIG
};

const Unit& unit(const std::string& name) {
  for (const Unit& u : kUnits)
    if (name == u.name) return u;
  TORCH_CHECK(false, "cutlass_probe: no configuration named ", name);
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kHalf && t.is_contiguous(), name,
              " must be a contiguous float16 CUDA tensor");
}

// y = epilogue(x·Wᵀ) through configuration `config`; bias and residual may be empty tensors when unused.
torch::Tensor gemm(const std::string& config, int64_t epilogue, const torch::Tensor& x, const torch::Tensor& w,
                   const torch::Tensor& bias, const torch::Tensor& residual, int64_t raster, int64_t swizzle) {
  check(x, "x");
  check(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] must share K");
  TORCH_CHECK(epilogue >= 0 && epilogue <= 3,
              "epilogue must be 0 (plain), 1 (bias+GELU), 2 (bias+residual) or 3 (bias+GELU, fast erf)");
  const auto kind = static_cast<probe::Epilogue>(epilogue);
  const int M = x.size(0), N = w.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0 && N % 8 == 0, "K and N must be multiples of 8 (16-byte TMA rows)");
  if (kind != probe::Epilogue::kPlain) {  // every other epilogue adds the bias
    check(bias, "bias");
    TORCH_CHECK(bias.numel() == N, "bias must hold N = ", N, " values");
  }
  if (kind == probe::Epilogue::kBiasResidual) {
    check(residual, "residual");
    TORCH_CHECK(residual.size(0) == M && residual.size(1) == N, "residual must be [M, N]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({M, N}, x.options());
  const probe::Problem problem{M, N, K, x.data_ptr(), w.data_ptr(),
                               kind == probe::Epilogue::kPlain ? nullptr : bias.data_ptr(),
                               kind == probe::Epilogue::kBiasResidual ? residual.data_ptr() : nullptr, y.data_ptr()};
  const probe::Options options{static_cast<int>(raster), static_cast<int>(swizzle)};
  const Unit& u = unit(config);
  auto workspace = torch::empty({static_cast<long>(u.workspace(kind, problem, options))},
                                x.options().dtype(torch::kUInt8));
  const probe::Outcome outcome =
      u.run(kind, problem, options, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(outcome == probe::Outcome::kLaunched, "cutlass_probe ", config, ": ",
              outcome == probe::Outcome::kUnsupported ? "CUTLASS cannot run this GEMM shape"
              : outcome == probe::Outcome::kInitializeFailed ? "CUTLASS initialize failed"
                                                             : "CUTLASS GEMM launch failed");
  return y;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "y = epilogue(x·Wᵀ) through one CUTLASS configuration");
}
