// Probes of the costs that the phase clock finds dominating the one-kernel layer at few rows on sm_90:
//   barrier  what one grid barrier costs on a full grid (one block per SM), for several ways of building it;
//   launch   what a kernel of one block per SM costs in a CUDA graph, launched cooperatively or not, with no grid
//            barrier or six (the phase clock has 2 µs of the layer's graph replay outside the kernel's stamps);
//   aread    how long every block of the grid takes to read the same 32 freshly written rows of A from L2 (what a
//            resident GEMM stage does first), against each block reading a quarter of K, and against blocks of a
//            cluster each reading a share and the rest from their neighbours' shared memory.
// Standalone: nvcc -O3 -std=c++17 -arch=sm_90a -o resident_probe resident_probe.cu && ./resident_probe
// Prints one JSON object per line.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(call)                                                                          \
  do {                                                                                       \
    cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

constexpr int kThreads = 256;
constexpr int kRows = 32, kK = 768;               // A of one 32-row group at BERT-base width
constexpr int kChunksPerWarp = kK / 32 / 8;        // 3: as in the resident GEMM
constexpr int kARounds = 24;

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned atom_add_release(unsigned* p, unsigned x) {
  unsigned old;
  asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(x) : "memory");
  return old;
}
__device__ __forceinline__ unsigned atom_add_acq_rel(unsigned* p, unsigned x) {
  unsigned old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(x) : "memory");
  return old;
}
__device__ __forceinline__ void red_add_release(unsigned* p, unsigned x) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
}

// Barrier forms. `state` is zeroed before each launch; `round` counts the barriers this launch has passed.
enum Form { kCg = 0, kFlipRelease = 1, kFlipFence = 2, kRedPoll = 3, kTwoLevel = 4, kForms = 5 };
const char* form_name(int f) {
  const char* names[] = {"cooperative_groups", "flip_atom_release", "flip_fence_atom", "red_release_poll",
                         "two_level_red"};
  return names[f];
}
constexpr int kGroup = 12;  // blocks per first-level counter of the two-level form

template <int FORM> __device__ __forceinline__ void barrier(unsigned* state, unsigned round) {
  if constexpr (FORM == kCg) {
    cg::this_grid().sync();
  } else {
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned n = gridDim.x;
      if constexpr (FORM == kFlipRelease || FORM == kFlipFence) {
        // One counter; block 0 adds 0x80000000 − (n − 1), the others 1, so the top bit flips once all arrived.
        const unsigned add = blockIdx.x == 0 ? 0x80000000u - (n - 1) : 1u;
        unsigned old;
        if constexpr (FORM == kFlipRelease) {
          old = atom_add_release(state, add);
          while (((old ^ ld_acquire(state)) & 0x80000000u) == 0) {
          }
        } else {
          __threadfence();
          old = atomicAdd(state, add);
          while (((old ^ ld_relaxed(state)) & 0x80000000u) == 0) {
          }
          __threadfence();
        }
      } else if constexpr (FORM == kRedPoll) {
        // A counter that only grows: arrive without waiting for the atomic's answer, then poll.
        red_add_release(state, 1u);
        const unsigned target = (round + 1) * n;
        while (ld_acquire(state) < target) {
        }
      } else {
        // Groups of kGroup blocks count on their own counters (state[1 + g], 32 words apart); the last of a group
        // adds the group's arrival to state[0], which every block polls.
        const unsigned group = blockIdx.x / kGroup, groups = (n + kGroup - 1) / kGroup;
        const unsigned members = min(n - group * kGroup, static_cast<unsigned>(kGroup));
        const unsigned old = atom_add_acq_rel(state + 32 * (1 + group), 1u);
        if (old == (round + 1) * members - 1) red_add_release(state, 1u);
        const unsigned target = (round + 1) * groups;
        while (ld_acquire(state) < target) {
        }
      }
    }
    __syncthreads();
  }
}

template <int FORM> __global__ void barrier_kernel(unsigned* state, int count, unsigned long long* elapsed) {
  barrier<FORM>(state, 0);  // every block has started
  const unsigned long long t0 = now();
  for (int i = 0; i < count; ++i) barrier<FORM>(state, i + 1);
  const unsigned long long t1 = now();
  if (threadIdx.x == 0) elapsed[blockIdx.x] = t1 - t0;
}

// Every block writes its share of A (so the lines are freshly written, as the stage before a GEMM leaves them),
// a grid barrier, then `readers` blocks read A as a resident GEMM's warps do: each lane 16 bytes per row and 32-deep
// chunk of its warp's chunks, into registers. QUARTER: a block reads only K quarter blockIdx % 4. CLUSTER > 1: the
// blocks of a cluster each read 1/CLUSTER of K into shared memory, meet at a cluster barrier, and take the rest of
// their fragments from the other blocks' shared memory. COPIES > 0: thread 0 copies A into shared memory with
// COPIES bulk copies (the copy engine, as the weight slices come in), and the lanes take their fragments from there.
template <int CLUSTER, bool QUARTER, int COPIES = 0>
__global__ void aread_kernel(uint4* A, int readers, unsigned* state, unsigned long long* stamps, unsigned* sink) {
  constexpr int kVecs = kRows * kK / 8;  // uint4s of A
  __shared__ uint4 share[kVecs / (CLUSTER > 1 ? CLUSTER : kVecs)];
  __shared__ uint64_t landed;
  extern __shared__ uint4 staged[];  // COPIES > 0: A, row-major
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
  if (COPIES > 0 && threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&landed)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  unsigned acc = 0;
  for (int round = 0; round < kARounds; ++round) {
    for (int v = blockIdx.x * kThreads + threadIdx.x; v < kVecs; v += gridDim.x * kThreads)
      A[v] = make_uint4(round, v, blockIdx.x, round ^ v);
    barrier<kFlipRelease>(state, 0);
    const unsigned long long t0 = now();
    if (static_cast<int>(blockIdx.x) < readers) {
      uint4 a[kChunksPerWarp][2][2];
      if constexpr (COPIES > 0) {
        constexpr int kBytes = kRows * kK * 2, kPiece = kBytes / COPIES;
        if (threadIdx.x == 0) {
          // A was written through the generic proxy; the copy engine reads through the async one.
          asm volatile("fence.proxy.async.global;\n" ::: "memory");
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(&landed)),
                       "r"(kBytes) : "memory");
          for (int c = 0; c < COPIES; ++c)
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                         ::"r"(smem_addr(staged + c * kPiece / 16)), "l"(A + c * kPiece / 16), "r"(kPiece),
                         "r"(smem_addr(&landed)) : "memory");
        }
        uint32_t done = 0;
        while (!done)
          asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                       " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(smem_addr(&landed)), "r"(round & 1) : "memory");
#pragma unroll
        for (int i = 0; i < kChunksPerWarp; ++i)
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) a[i][mi][h] = staged[((mi * 16 + h * 8 + gq) * kK + (warp + i * 8) * 32 + t * 8) / 8];
      } else if constexpr (CLUSTER > 1) {
        cg::cluster_group cluster = cg::this_cluster();
        const int rank = static_cast<int>(cluster.block_rank());
        constexpr int kShareK = kK / CLUSTER, kShareVecs = kRows * kShareK / 8;
        for (int v = threadIdx.x; v < kShareVecs; v += kThreads) {
          const int row = v / (kShareK / 8), col = v % (kShareK / 8);
          share[v] = __ldcg(A + row * (kK / 8) + rank * (kShareK / 8) + col);
        }
        cluster.sync();
#pragma unroll
        for (int i = 0; i < kChunksPerWarp; ++i) {
          const int k = (warp + i * 8) * 32 + t * 8, owner = k / kShareK, col = (k % kShareK) / 8;
          const uint4* remote = cluster.map_shared_rank(share, owner);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) a[i][mi][h] = remote[(mi * 16 + h * 8 + gq) * (kShareK / 8) + col];
        }
      } else {
#pragma unroll
        for (int i = 0; i < kChunksPerWarp; ++i) {
          const int chunk = warp + i * 8;
          const bool mine = !QUARTER || chunk / 6 == static_cast<int>(blockIdx.x % 4);
          const int k = chunk * 32 + t * 8;
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              a[i][mi][h] = mine ? __ldcg(A + ((mi * 16 + h * 8 + gq) * kK + k) / 8) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int i = 0; i < kChunksPerWarp; ++i)
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) acc ^= a[i][mi][h].x ^ a[i][mi][h].y ^ a[i][mi][h].z ^ a[i][mi][h].w;
      __syncthreads();  // every warp's fragments in, as a GEMM's block barrier after its sums
      if constexpr (CLUSTER > 1) cg::this_cluster().sync();  // the shares may be overwritten next round
    }
    const unsigned long long t1 = now();
    if (threadIdx.x == 0) stamps[round * gridDim.x + blockIdx.x] = t1 - t0;
    barrier<kFlipRelease>(state, 0);  // nobody writes A while others still read it
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;
}

// One block per SM (its dynamic shared memory keeps a second one off), `barriers` grid barriers, nothing else.
__global__ void short_kernel(unsigned* state, int barriers) {
  extern __shared__ char held[];
  for (int i = 0; i < barriers; ++i) barrier<kFlipRelease>(state, 0);
  if (barriers < 0) held[threadIdx.x] = 0;  // never: keeps the shared memory in use
}

static double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

template <int FORM> void run_barrier(int sms, unsigned* state, unsigned long long* elapsed) {
  constexpr int kCount = 200;
  std::vector<double> per_barrier;
  for (int rep = 0; rep < 12; ++rep) {
    CHECK(cudaMemset(state, 0, 4096));
    int count = kCount;
    void* params[] = {&state, &count, &elapsed};
    CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(barrier_kernel<FORM>), dim3(sms), dim3(kThreads),
                                      params, 0, nullptr));
    CHECK(cudaDeviceSynchronize());
    std::vector<unsigned long long> host(sms);
    CHECK(cudaMemcpy(host.data(), elapsed, sms * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
    if (rep >= 2) per_barrier.push_back(static_cast<double>(host[0]) / kCount / 1000.0);
  }
  std::sort(per_barrier.begin(), per_barrier.end());
  std::printf("{\"probe\": \"barrier\", \"form\": \"%s\", \"blocks\": %d, \"us_per_barrier_median\": %.3f, "
              "\"us_min\": %.3f, \"us_max\": %.3f}\n",
              form_name(FORM), sms, median_of(per_barrier), per_barrier.front(), per_barrier.back());
}

template <int CLUSTER, bool QUARTER, int COPIES = 0>
void run_aread(const char* name, int sms, int readers, uint4* A, unsigned* state, unsigned long long* stamps,
               unsigned* sink) {
  CHECK(cudaMemset(state, 0, 4096));
  const int staged = COPIES > 0 ? kRows * kK * 2 : 0;
  CHECK(cudaFuncSetAttribute(aread_kernel<CLUSTER, QUARTER, COPIES>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             staged));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(sms);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = staged;
  cudaLaunchAttribute attrs[2];
  int n = 0;
  attrs[n].id = cudaLaunchAttributeCooperative;
  attrs[n++].val.cooperative = 1;
  if (CLUSTER > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = CLUSTER;
    attrs[n].val.clusterDim.y = 1;
    attrs[n++].val.clusterDim.z = 1;
    int clusters = 0;
    cudaLaunchConfig_t query = config;
    query.attrs = attrs + 1;
    query.numAttrs = 1;
    cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, aread_kernel<CLUSTER, QUARTER, COPIES>, &query);
    std::printf("{\"probe\": \"cluster_occupancy\", \"cluster\": %d, \"max_active_clusters\": %d, \"needed\": %d, "
                "\"error\": \"%s\"}\n",
                CLUSTER, clusters, sms / CLUSTER, cudaGetErrorString(err));
    (void)cudaGetLastError();
  }
  // A cooperative launch with clusters, else (where the runtime refuses the pair) a plain one: the probe's own
  // barrier needs only that every block is resident, which the occupancy query above tells.
  cudaError_t err = cudaErrorUnknown;
  int cooperative = 1;
  for (; cooperative >= 0 && err != cudaSuccess; --cooperative) {
    config.attrs = cooperative ? attrs : attrs + 1;
    config.numAttrs = cooperative ? n : n - 1;
    err = cudaLaunchKernelEx(&config, aread_kernel<CLUSTER, QUARTER, COPIES>, A, readers, state, stamps, sink);
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      std::printf("{\"probe\": \"aread\", \"form\": \"%s\", \"cooperative\": %d, \"error\": \"%s\"}\n", name,
                  cooperative, cudaGetErrorString(err));
      (void)cudaGetLastError();
      if (CLUSTER == 1) return;
    }
  }
  if (err != cudaSuccess) return;
  std::vector<unsigned long long> host(kARounds * sms);
  CHECK(cudaMemcpy(host.data(), stamps, host.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  std::vector<double> medians, slowest;
  for (int round = 2; round < kARounds; ++round) {
    std::vector<double> blocks;
    for (int b = 0; b < readers; ++b) blocks.push_back(host[round * sms + b] / 1000.0);
    medians.push_back(median_of(blocks));
    slowest.push_back(*std::max_element(blocks.begin(), blocks.end()));
  }
  std::printf("{\"probe\": \"aread\", \"form\": \"%s\", \"cooperative\": %d, \"readers\": %d, "
              "\"bytes_from_l2_per_block\": %d, \"us_block_median\": %.3f, \"us_slowest_block\": %.3f}\n",
              name, cooperative + 1, readers, QUARTER ? kRows * kK * 2 / 4 : kRows * kK * 2 / CLUSTER, median_of(medians),
              median_of(slowest));
}

// A CUDA graph of `kernels` launches of short_kernel, replayed back to back; µs per kernel.
void run_launch(int sms, unsigned* state, bool cooperative, int barriers, int kernels) {
  constexpr int kSmem = 150 * 1024;
  CHECK(cudaFuncSetAttribute(short_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  CHECK(cudaMemset(state, 0, 4096));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(sms);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmem;
  config.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  config.attrs = &attr;
  config.numAttrs = cooperative ? 1 : 0;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int k = 0; k < kernels; ++k) CHECK(cudaLaunchKernelEx(&config, short_kernel, state, barriers));
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  constexpr int kReplays = 50;
  std::vector<double> per_kernel;
  for (int sample = 0; sample < 22; ++sample) {
    CHECK(cudaEventRecord(start, stream));
    for (int r = 0; r < kReplays; ++r) CHECK(cudaGraphLaunch(exec, stream));
    CHECK(cudaEventRecord(stop, stream));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (sample >= 2) per_kernel.push_back(1000.0 * ms / (kReplays * kernels));
  }
  std::sort(per_kernel.begin(), per_kernel.end());
  std::printf("{\"probe\": \"launch\", \"cooperative\": %d, \"barriers\": %d, \"kernels_per_graph\": %d, "
              "\"us_per_kernel_median\": %.3f, \"us_min\": %.3f, \"us_max\": %.3f}\n",
              cooperative ? 1 : 0, barriers, kernels, median_of(per_kernel), per_kernel.front(), per_kernel.back());
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  CHECK(cudaStreamDestroy(stream));
}

int main() {
  int device = 0, sms = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("{\"probe\": \"device\", \"name\": \"%s\", \"sms\": %d}\n", prop.name, sms);
  unsigned* state = nullptr;
  unsigned long long *elapsed = nullptr, *stamps = nullptr;
  uint4* A = nullptr;
  unsigned* sink = nullptr;
  CHECK(cudaMalloc(&state, 4096));
  CHECK(cudaMalloc(&elapsed, sms * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&stamps, kARounds * sms * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&A, kRows * kK * 2));
  CHECK(cudaMalloc(&sink, sms * sizeof(unsigned)));

  run_barrier<kCg>(sms, state, elapsed);
  run_barrier<kFlipRelease>(sms, state, elapsed);
  run_barrier<kFlipFence>(sms, state, elapsed);
  run_barrier<kRedPoll>(sms, state, elapsed);
  run_barrier<kTwoLevel>(sms, state, elapsed);

  for (bool cooperative : {false, true})
    for (int barriers : {0, 6})
      for (int kernels : {1, 20}) run_launch(sms, state, cooperative, barriers, kernels);

  const int grid = sms - sms % 4;  // the cluster forms need a grid their size divides
  for (int readers : {grid, 96, 33, 24}) run_aread<1, false>("whole_k_from_l2", grid, readers, A, state, stamps, sink);
  for (int readers : {grid, 96}) run_aread<1, true>("quarter_k_from_l2", grid, readers, A, state, stamps, sink);
  run_aread<2, false>("cluster2_dsmem", grid, grid, A, state, stamps, sink);
  run_aread<4, false>("cluster4_dsmem", grid, grid, A, state, stamps, sink);
  for (int readers : {grid, 96}) {
    run_aread<1, false, 1>("one_bulk_copy_to_smem", grid, readers, A, state, stamps, sink);
    run_aread<1, false, 4>("four_bulk_copies_to_smem", grid, readers, A, state, stamps, sink);
  }
  return 0;
}
