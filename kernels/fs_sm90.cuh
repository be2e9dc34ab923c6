// What the sm_90a kernel headers share: CUTLASS's element types and the test for an sm_90 device.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cutlass/numeric_types.h"

namespace fs::sm90 {

template <class T> struct CutlassType;
template <> struct CutlassType<half> { using type = cutlass::half_t; };
template <> struct CutlassType<__nv_bfloat16> { using type = cutlass::bfloat16_t; };

// Whether the current device is sm_90. The kernels exist only in sm_90a builds; a library rebuilt for another GPU
// (an exported plan) keeps to its generated kernels.
inline bool on_sm90() {
  static int capability[64] = {0};  // major·10 + minor per device, 0 until asked
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (capability[device] == 0) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
      return false;
    capability[device] = major * 10 + minor;
  }
  return capability[device] == 90;
}

}  // namespace fs::sm90
