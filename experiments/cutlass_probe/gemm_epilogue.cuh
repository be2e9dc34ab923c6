// The probe's view of kernels/fs_gemm_sm90.cuh: one entry point per configuration unit that takes the epilogue
// at run time, so the torch binding can call every unit without instantiating CUTLASS itself.
#pragma once
#include "fs_gemm_sm90.cuh"

namespace probe {
using fs::sm90::Options;
using fs::sm90::Outcome;
using fs::sm90::Problem;
using Elem = cutlass::half_t;

enum class Epilogue { kPlain = 0, kBiasGelu = 1, kBiasResidual = 2, kBiasGeluFast = 3, kBiasGeluLean = 4 };

template <class Cfg> Outcome run(Epilogue epilogue, const Problem& p, Options options, void* workspace,
                                 cudaStream_t stream) {
  using namespace fs::sm90;
  switch (epilogue) {
    case Epilogue::kPlain: return launch<Elem, Cfg, Plain<Elem>>(p, options, workspace, stream);
    case Epilogue::kBiasGelu: return launch<Elem, Cfg, BiasGelu<Elem>>(p, options, workspace, stream);
    case Epilogue::kBiasResidual: return launch<Elem, Cfg, BiasAdd<Elem>>(p, options, workspace, stream);
    case Epilogue::kBiasGeluFast: return launch<Elem, Cfg, BiasGeluFast<Elem>>(p, options, workspace, stream);
    case Epilogue::kBiasGeluLean: return launch<Elem, Cfg, BiasGeluLean<Elem>>(p, options, workspace, stream);
  }
  return Outcome::kUnsupported;
}

template <class Cfg> size_t workspace(Epilogue epilogue, const Problem& p, Options options) {
  using namespace fs::sm90;
  switch (epilogue) {
    case Epilogue::kPlain: return workspace_bytes<Elem, Cfg, Plain<Elem>>(p, options);
    case Epilogue::kBiasGelu: return workspace_bytes<Elem, Cfg, BiasGelu<Elem>>(p, options);
    case Epilogue::kBiasResidual: return workspace_bytes<Elem, Cfg, BiasAdd<Elem>>(p, options);
    case Epilogue::kBiasGeluFast: return workspace_bytes<Elem, Cfg, BiasGeluFast<Elem>>(p, options);
    case Epilogue::kBiasGeluLean: return workspace_bytes<Elem, Cfg, BiasGeluLean<Elem>>(p, options);
  }
  return 0;
}
}  // namespace probe

// What each configuration unit defines (PROBE_DEFINE) and the binding declares (PROBE_DECLARE) under its name.
#define PROBE_DECLARE(name)                                                                                        \
  namespace probe {                                                                                                \
  Outcome run_##name(Epilogue, const Problem&, Options, void* workspace, cudaStream_t);                            \
  size_t workspace_##name(Epilogue, const Problem&, Options);                                                      \
  }
#define PROBE_DEFINE(name, ...)                                                                                    \
  PROBE_DECLARE(name)                                                                                              \
  namespace probe {                                                                                                \
  Outcome run_##name(Epilogue e, const Problem& p, Options o, void* ws, cudaStream_t s) {                          \
    return run<__VA_ARGS__>(e, p, o, ws, s);                                                                       \
  }                                                                                                                \
  size_t workspace_##name(Epilogue e, const Problem& p, Options o) { return workspace<__VA_ARGS__>(e, p, o); }     \
  }
