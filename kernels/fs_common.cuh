// Element types, vector access, cp.async / ldmatrix / mma.sync wrappers and grid-wide synchronisation.
#pragma once
#include <cfloat>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fs_args.h"

namespace fs {

constexpr int kThreads = 256;  // every segment kernel runs 8 warps per block
constexpr int kWarps = kThreads / 32;

template <class T> struct Elem;
template <> struct Elem<half> {
  using Pair = half2;
  static __device__ __forceinline__ float to_float(half v) { return __half2float(v); }
  static __device__ __forceinline__ half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ Pair pack(float a, float b) { return __floats2half2_rn(a, b); }
  static constexpr float kLowest = -65504.0f;
};
template <> struct Elem<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ Pair pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static constexpr float kLowest = -3.38953139e38f;
};

template <class T> __device__ __forceinline__ float to_f(T v) { return Elem<T>::to_float(v); }
template <class T> __device__ __forceinline__ T from_f(float v) { return Elem<T>::from_float(v); }

// Store a value that may be the additive mask's lowest float without turning it into -inf in T.
template <class T> __device__ __forceinline__ T from_f_sat(float v) { return from_f<T>(fmaxf(v, Elem<T>::kLowest)); }

// Eight consecutive elements: one 16-byte access.
template <class T> struct alignas(16) Vec8 { T v[8]; };

template <class T> __device__ __forceinline__ void load8(const T* p, float out[8]) {
  Vec8<T> chunk = *reinterpret_cast<const Vec8<T>*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(chunk.v[i]);
}
template <class T> __device__ __forceinline__ void store8(T* p, const float in[8]) {
  Vec8<T> chunk;
#pragma unroll
  for (int i = 0; i < 8; ++i) chunk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec8<T>*>(p) = chunk;
}
template <class T> __device__ __forceinline__ void store2(T* p, float a, float b) {
  *reinterpret_cast<typename Elem<T>::Pair*>(p) = Elem<T>::pack(a, b);
}

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// 2^x on the special-function unit (flushes denormals; 2^-inf = 0), for softmax exponentials.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Exact-erf GELU for GEMM epilogues bound by instruction issue: GELU(x) = relu(x) − |x|·Φ(−|x|) with
// Φ(−z) = 2^q(z), q a degree-7 polynomial fitted on [0, 6] (experiments/gelu_fit.py): one exp2 on the
// special-function unit and 10 FFMA/FMNMX, against two and 18 for Abramowitz & Stegun 7.1.26. Rounded to fp16 it
// is off by one ulp for 0.09 % of all fp16 inputs (A&S: 0.75 %, from cancellation below x ≈ −3). Past z = 6 the
// polynomial keeps falling, so large negative x give −0; +inf gives +inf and NaN stays NaN.
__device__ __forceinline__ float gelu_erf_fast(float x) {
  const float z = fabsf(x);
  const float a = fminf(z, FLT_MAX);  // no inf·0 for x = ±inf
  const float relu = fmaxf(x, -0.0f);
  float q = -1.614106054e-6f;
  q = fmaf(q, z, 5.724131552e-5f);
  q = fmaf(q, z, -8.970971685e-4f);
  q = fmaf(q, z, 8.382379077e-3f);
  q = fmaf(q, z, -5.372184142e-2f);
  q = fmaf(q, z, -4.586765170e-1f);
  q = fmaf(q, z, -1.151180148f);
  q = fmaf(q, z, -1.0f);  // Φ(0) = 1/2 exactly
  return fmaf(-a, fast_exp2(q), relu);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// --- asynchronous copies (zero-filled when the source is out of range) ---
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// --- tensor-core fragments ---
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

// D = A·B + D for one m16n8k16 tile, fp32 accumulate.
template <class T> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <> __device__ __forceinline__ void mma16816<half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <class T> __device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  typename Elem<T>::Pair p = Elem<T>::pack(a, b);
  return *reinterpret_cast<uint32_t*>(&p);
}

// Barrier `id` (1–15; 0 is __syncthreads) over `threads` threads, a multiple of 32: independent warp groups of
// one block synchronise without waiting for each other.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Grid-wide barrier between the stages of a persistent segment kernel; a cooperative launch guarantees that every
// block is resident. One counter: block 0 adds 2^31 − (blocks − 1) and every other block 1, so its top bit flips
// once all have arrived and its low bits return to zero, ready for the next barrier and the next launch. Thread 0
// arrives with release semantics and polls with acquire loads, between two block barriers: 1.00 µs a barrier on
// 132 blocks of an H100, against 1.12 for cooperative_groups' grid sync, which fences apart from its atomic
// (experiments/resident_probe).
__device__ __forceinline__ void grid_barrier(const LayerArgs& a) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int* counter = a.splitk_counters + kGridBarrierWord;
    const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    unsigned int before, now;
    asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;\n" : "=r"(before) : "l"(counter), "r"(add) : "memory");
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(now) : "l"(counter) : "memory");
    } while (((before ^ now) & 0x80000000u) == 0);
  }
  __syncthreads();
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int max_of(int a, int b) { return a > b ? a : b; }

}  // namespace fs
