// Few-row GEMM probe: times fs::gemm_run tile and split-K variants on the four BERT-base layer GEMMs at
// 32 and 128 rows, weights rotated past L2, each launch a CUDA-graph node. Standalone (nvcc, no torch):
//   nvcc -std=c++17 -O3 -DNDEBUG -arch=sm_90a -I kernels experiments/skinny_probe/skinny_gemm.cu -o probe && ./probe
#include <algorithm>
#include <cstdio>
#include <vector>

#include "fs_gemm_ops.cuh"

namespace {

// A tile configuration with a fixed split count (0: the configuration's own policy).
template <class Base, int FORCED_SPLITS> struct Forced : Base {
  static __host__ __device__ int splits(const fs::GemmShape& g) {
    return FORCED_SPLITS > 0 ? FORCED_SPLITS : Base::splits(g);
  }
  static __host__ __device__ int work(const fs::GemmShape& g) { return Base::tiles(g) * splits(g); }
};

template <class Cfg>
__global__ void __launch_bounds__(fs::kThreads, 2) probe_kernel(fs::GemmShape g, const half* a, const half* w,
                                                                  half* c, fs::SplitK sk) {
  extern __shared__ __align__(16) char smem[];
  const fs::RowMajorA<half> A{a, g.K, 0};
  const fs::MatB<half> B{w, g.K, 0};
  fs::gemm_run<Cfg>(g, A, B, [=](int, int row, int col, float v0, float v1) {
    fs::store2(c + static_cast<long long>(row) * g.N + col, v0, v1);
  }, smem, sk);
}

struct Buffers {
  half* a;
  std::vector<half*> w;
  half* c;
  fs::SplitK sk;
};

template <class Cfg> float time_variant(const fs::GemmShape& g, const Buffers& buf, int resident_per_sm) {
  const int smem = Cfg::SMEM_BYTES;
  cudaFuncSetAttribute(probe_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int grid = std::min(Cfg::work(g), resident_per_sm * sms);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
  for (half* w : buf.w) probe_kernel<Cfg><<<grid, fs::kThreads, smem, stream>>>(g, buf.a, w, buf.c, buf.sk);
  cudaStreamEndCapture(stream, &graph);
  cudaGraphInstantiate(&exec, graph, 0);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> per_launch;
  for (int rep = 0; rep < 12; ++rep) {
    cudaEventRecord(start, stream);
    cudaGraphLaunch(exec, stream);
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (rep >= 2) per_launch.push_back(ms * 1000.f / buf.w.size());
  }
  std::sort(per_launch.begin(), per_launch.end());
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) std::printf("CUDA error %s\n", cudaGetErrorString(err));
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return per_launch[per_launch.size() / 2];
}

// The tiles the segment kernels use, and two shallower-K variants of the few-row tile.
using Skinny128 = fs::SkinnyTile<half>;
using Skinny64 = fs::GemmTile<half, 32, 64, 2, false, 6, 64, true>;
using Skinny32 = fs::GemmTile<half, 32, 64, 2, false, 6, 32, false>;
using Linear = fs::LinearTile<half>;

}  // namespace

int main() {
  const int dims[4][2] = {{2304, 768}, {768, 768}, {3072, 768}, {768, 3072}};  // N, K of qkv, out, ffn1, ffn2
  const char* names[4] = {"qkv", "out", "ffn1", "ffn2"};
  Buffers buf;
  const size_t max_w = 3072 * 768;
  cudaMalloc(&buf.a, 128 * 3072 * sizeof(half));
  cudaMalloc(&buf.c, 128 * 3072 * sizeof(half));
  cudaMemset(buf.a, 0, 128 * 3072 * sizeof(half));
  for (int i = 0; i < 24; ++i) {  // 24 × 4.7 MB: more than twice the L2
    half* w;
    cudaMalloc(&w, max_w * sizeof(half));
    cudaMemset(w, 0, max_w * sizeof(half));
    buf.w.push_back(w);
  }
  cudaMalloc(&buf.sk.partials, 512 * 64 * 128 * sizeof(float));
  cudaMalloc(&buf.sk.counters, 1024 * sizeof(unsigned));
  cudaMemset(buf.sk.counters, 0, 1024 * sizeof(unsigned));
  std::printf("rows gemm | skinny128(policy) s1 s2 s4 | skinny64(policy) | skinny32(ceil policy) | linear(policy)  [us per launch]\n");
  for (int rows : {32, 128}) {
    for (int i = 0; i < 4; ++i) {
      const fs::GemmShape g{rows, dims[i][0], dims[i][1], 1};
      std::printf("%4d %-4s | %6.2f (s=%d) %6.2f %6.2f %6.2f | %6.2f (s=%d) | %6.2f (s=%d) | %6.2f (s=%d)\n", rows, names[i],
                  time_variant<Skinny128>(g, buf, 2), Skinny128::splits(g),
                  time_variant<Forced<Skinny128, 1>>(g, buf, 2), time_variant<Forced<Skinny128, 2>>(g, buf, 2),
                  time_variant<Forced<Skinny128, 4>>(g, buf, 2),
                  time_variant<Skinny64>(g, buf, 2), Skinny64::splits(g),
                  time_variant<Skinny32>(g, buf, 2), Skinny32::splits(g),
                  time_variant<Linear>(g, buf, 2), Linear::splits(g));
    }
  }
  return 0;
}
