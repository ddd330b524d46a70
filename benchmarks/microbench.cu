// Microbenchmarks of the primitives a persistent RNN step is built from, on the GPU at hand.
//
// Every estimate in benchmarks/NOTES.md rests on a few per-step costs that nothing in this
// project has measured yet: a chip-wide barrier (ANCHORS.md has grid.sync() on an H100 only),
// a thread-block cluster's barrier, the read of an exchange buffer from L2 into shared memory,
// and, for the distributed-shared-memory lead, writing it into the peers' shared memory instead.
// This program times each of them alone, in a loop of steps, so the NOTES estimates (and the
// S1 and S5 leads) can be priced before any kernel is written for them.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o microbench benchmarks/microbench.cu
//   ./microbench [--check-only] [TABLE.md]   # prints a markdown table, and writes it to TABLE.md
//
// --check-only runs the checked passes alone (a few steps, no timing): that is how CI runs the
// program on the CPU, under cudasim (tests/cuda/sim), in several thread orders.
//
// What each row times, per step, with one 256-thread block per SM and one kernel launch per
// measurement (the launch itself is subtracted: a run of 0 steps is timed too):
// - grid.sync: the cooperative grid's barrier, alone;
// - cluster.sync c=N: the barrier of clusters of N blocks, as many clusters as the chip holds;
// - exchange grid X: the step of the persistent kernels today. Each block writes its share of
//   an X-byte buffer to global memory (double-buffered by step parity), grid.sync(), then every
//   block copies all X bytes into its shared memory with cp.async (16 B each) and waits;
// - exchange cluster-global c=N X: the same, with each cluster of N exchanging its own buffer
//   and the cluster's barrier (cluster mode, FUSED_RNN_CUDA_CLUSTER);
// - exchange dsmem c=N X: each block writes its share straight into every peer's shared memory
//   (double-buffered), then the cluster's barrier; the data is then already on chip;
// - exchange dsmem-mbarrier c=N X: the same writes as st.async, each of which counts its bytes
//   off an mbarrier in the receiving block; a block waits on its own mbarrier until the whole
//   step has landed. No cluster barrier in the step: on sm_90 every cluster.sync() compiles to
//   a GPU-wide fence (MEMBAR.ALL.GPU) before the barrier itself, this step has none.
// - exchange grid-tagged X: the grid exchange with no barrier at all. X bytes of 16-bit values
//   (h, or the dgates, in bf16/fp16) travel as 2X bytes of 32-bit words, each a value in its low
//   half and the step's tag in its high half (NCCL's low-latency protocol, in 32-bit words).
//   Each block writes its share with relaxed 16-byte stores, then every block loads every
//   word with relaxed loads (8 chunks in flight a thread), reloads a chunk until its four tags
//   say this step, and keeps the values in shared memory. A 32-bit store is single-copy atomic,
//   so a word's tag vouches for its value: no fence and no grid.sync(). What a step then costs
//   is about one trip through L2 after the last block's store, against "exchange grid"'s
//   grid.sync() and copy: the barrier-free step the persistent kernels could take.
// - fetch N KB: one pass through N KB of straight-line code (independent FFMAs) on every SM,
//   with one warp and with eight warps an SM, and its cycles per instruction and warp: what an
//   instruction costs once a step's code no longer fits in the instruction caches.
// Before timing, every exchange runs a checked pass: each block compares every word it received
// with the value its writer stored for that step, and the table's "errors" column counts the
// mismatches (it must be 0: a nonzero count means a visibility bug in this program or the
// memory model is not what the kernels rely on).
//
// Host code uses the C++ standard library; this is a benchmark program, not part of csrc/.
// The few device intrinsics cudasim models differently are behind __CUDA_SIM__.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(call)                                                                      \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,           \
                   cudaGetErrorString(err_));                                            \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

constexpr int kThreads = 256;

// The word a writer stores at index i of the step-s buffer of launch `salt` (0 for timed
// launches, a fresh number for each checked one): a check can tell steps, places and launches
// apart, so what an earlier launch left in memory cannot pass for this one's data.
__device__ __forceinline__ uint32_t expected_word(uint32_t salt, int step, uint32_t i) {
  return salt * 0xC2B2AE35u + static_cast<uint32_t>(step) * 0x9E3779B1u + i * 0x85EBCA6Bu + 1u;
}

// The 16-byte chunks [first, last) that member `rank` of `members` writes of an n16-chunk buffer.
__device__ __forceinline__ void share(uint32_t n16, uint32_t rank, uint32_t members,
                                      uint32_t* first, uint32_t* last) {
  *first = static_cast<uint32_t>((uint64_t)n16 * rank / members);
  *last = static_cast<uint32_t>((uint64_t)n16 * (rank + 1) / members);
}

__device__ __forceinline__ uint4 chunk_value(uint32_t salt, int step, uint32_t c) {
  return make_uint4(expected_word(salt, step, 4 * c), expected_word(salt, step, 4 * c + 1),
                    expected_word(salt, step, 4 * c + 2), expected_word(salt, step, 4 * c + 3));
}

// Counts the words of the n16-chunk shared buffer that differ from step s's values.
__device__ void check_buffer(const uint4* buf, uint32_t n16, uint32_t salt, int step,
                             unsigned* errors) {
  unsigned bad = 0;
  for (uint32_t c = threadIdx.x; c < n16; c += blockDim.x) {
    const uint4 v = buf[c], e = chunk_value(salt, step, c);
    bad += (v.x != e.x) + (v.y != e.y) + (v.z != e.z) + (v.w != e.w);
  }
  if (bad) atomicAdd(errors, bad);
}

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef __CUDA_SIM__
  return reinterpret_cast<T*>(::cudasim::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<T*>(smem);
#endif
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef __CUDA_SIM__
  ::cudasim::cp_async(smem, gmem, 16);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#ifdef __CUDA_SIM__
  ::cudasim::cp_async_commit();
  ::cudasim::cp_async_wait(0);
#else
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// mbarriers and st.async (sm_90): an mbarrier's phase completes when its pending arrivals and
// its transaction count (bytes announced by arrive.expect_tx, less the bytes st.async delivered
// to it) both reach zero; try_wait.parity returns once the phase of that parity has completed.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef __CUDA_SIM__
  (void)p;
  return 0;
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#ifdef __CUDA_SIM__
  ::cudasim::mbarrier_init(bar, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n"
               "fence.mbarrier_init.release.cluster;\n" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#ifdef __CUDA_SIM__
  ::cudasim::mbarrier_arrive_expect_tx(bar, bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, unsigned parity) {
#ifdef __CUDA_SIM__
  ::cudasim::mbarrier_wait_parity(bar, parity);
#else
  asm volatile("{\n.reg .pred done;\nWAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
#endif
}

// Stores v at `dst` in the shared memory of cluster block `rank` (dst and bar are this block's
// addresses of the same places) and counts its 16 bytes off that block's mbarrier `bar`.
__device__ __forceinline__ void st_async16(const cg::cluster_group& cluster, uint4* dst,
                                           const uint4& v, uint64_t* bar, unsigned rank) {
#ifdef __CUDA_SIM__
  ::cudasim::st_async(cluster.map_shared_rank(dst, rank), &v, 16,
                      cluster.map_shared_rank(bar, rank));
#else
  (void)cluster;
  uint32_t remote_dst, remote_bar;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote_dst)
               : "r"(smem_u32(dst)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote_bar)
               : "r"(smem_u32(bar)), "r"(rank));
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(remote_dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(remote_bar)
      : "memory");
#endif
}

// ---- barriers alone ------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 1) grid_sync_kernel(int steps) {
  cg::grid_group grid = cg::this_grid();
  for (int s = 0; s < steps; ++s) grid.sync();
}

__global__ void __launch_bounds__(kThreads, 1) cluster_sync_kernel(int steps) {
  cg::cluster_group cluster = cg::this_cluster();
  for (int s = 0; s < steps; ++s) cluster.sync();
}

// ---- exchanges -----------------------------------------------------------------------------

// Global exchange: `members` blocks (the grid, or one cluster) share an X-byte buffer (n16
// chunks) per step parity in `exchange`, a pair per cluster; every member then copies the whole
// buffer into shared memory. A nonzero `salt` checks every copied word.
template <bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    exchange_global_kernel(uint4* exchange, uint32_t n16, int steps, uint32_t salt,
                           unsigned* errors) {
  uint4* stage = dynamic_smem<uint4>();
  uint32_t rank, members, group;
  if constexpr (kCluster) {
    cg::cluster_group cluster = cg::this_cluster();
    rank = cluster.block_rank();
    members = cluster.num_blocks();
    group = blockIdx.x / members;
  } else {
    rank = blockIdx.x;
    members = gridDim.x;
    group = 0;
  }
  uint32_t first, last;
  share(n16, rank, members, &first, &last);
  for (int s = 0; s < steps; ++s) {
    uint4* buf = exchange + ((size_t)group * 2 + (s & 1)) * n16;
    for (uint32_t c = first + threadIdx.x; c < last; c += blockDim.x)
      buf[c] = chunk_value(salt, s, c);
    if constexpr (kCluster) {
      cg::this_cluster().sync();
    } else {
      cg::this_grid().sync();
    }
    for (uint32_t c = threadIdx.x; c < n16; c += blockDim.x) cp_async16(stage + c, buf + c);
    cp_async_wait_all();
    __syncthreads();
    if (salt) check_buffer(stage, n16, salt, s, errors);
    __syncthreads();  // the stage is rewritten next step
  }
}

// DSMEM exchange: each member writes its share of the step's buffer into the shared memory of
// every block of its cluster (itself included), two buffers deep, then the cluster's barrier.
// A buffer written at step s is rewritten at step s + 2, after every member has passed the
// barrier of step s + 1, which it reaches only after reading the buffer at step s.
__global__ void __launch_bounds__(kThreads, 1)
    exchange_dsmem_kernel(uint32_t n16, int steps, uint32_t salt, unsigned* errors) {
  uint4* bufs = dynamic_smem<uint4>();  // 2 x n16
  cg::cluster_group cluster = cg::this_cluster();
  const uint32_t rank = cluster.block_rank(), members = cluster.num_blocks();
  uint32_t first, last;
  share(n16, rank, members, &first, &last);
  cluster.sync();  // every peer has started: its shared memory exists before anyone writes it
  for (int s = 0; s < steps; ++s) {
    uint4* local = bufs + (size_t)(s & 1) * n16;
    for (uint32_t peer = 0; peer < members; ++peer) {
      // Start at a different peer in each block, so the blocks do not all write to one SM.
      const uint32_t p = (peer + rank) % members;
      uint4* remote = cluster.map_shared_rank(local, p);
      for (uint32_t c = first + threadIdx.x; c < last; c += blockDim.x)
        remote[c] = chunk_value(salt, s, c);
    }
    cluster.sync();
    if (salt) check_buffer(local, n16, salt, s, errors);
  }
  // No trailing barrier is needed before exiting: the last remote write precedes the last
  // step's barrier, and a block's shared memory must outlive only its peers' accesses.
}

// DSMEM exchange with mbarriers: as exchange_dsmem_kernel, but each 16-byte store is an
// st.async that counts its bytes off the receiving block's mbarrier for that buffer, and a
// block waits on its own mbarrier (the whole step landed) instead of at the cluster's barrier.
// Two buffers, each with its mbarrier. A peer rewrites a buffer (step s + 2) only after it has
// received this block's step s + 1 share, which this block sends after it has read its step s
// buffer (the __syncthreads ending each step); in the RNN kernels the same order comes from
// the recurrence itself, as step s + 1 needs all of step s.
__global__ void __launch_bounds__(kThreads, 1)
    exchange_mbarrier_kernel(uint32_t n16, int steps, uint32_t salt, unsigned* errors) {
  uint4* bufs = dynamic_smem<uint4>();  // 2 x n16, then the two mbarriers
  uint64_t* bars = reinterpret_cast<uint64_t*>(bufs + 2 * (size_t)n16);
  cg::cluster_group cluster = cg::this_cluster();
  const uint32_t rank = cluster.block_rank(), members = cluster.num_blocks();
  uint32_t first, last;
  share(n16, rank, members, &first, &last);
  if (threadIdx.x == 0) {
    mbar_init(&bars[0], 1);
    mbar_init(&bars[1], 1);
  }
  cluster.sync();  // every peer's mbarriers exist and are initialised before anyone sends
  for (int s = 0; s < steps; ++s) {
    const int b = s & 1;
    uint4* local = bufs + (size_t)b * n16;
    if (threadIdx.x == 0) mbar_arrive_expect_tx(&bars[b], n16 * 16);
    for (uint32_t peer = 0; peer < members; ++peer) {
      const uint32_t p = (peer + rank) % members;
      for (uint32_t c = first + threadIdx.x; c < last; c += blockDim.x)
        st_async16(cluster, local + c, chunk_value(salt, s, c), &bars[b], p);
    }
    mbar_wait_parity(&bars[b], (s >> 1) & 1);
    if (salt) check_buffer(local, n16, salt, s, errors);
    __syncthreads();  // this step's buffer is read before this block sends the next step
  }
  // No trailing barrier: every byte sent to a block lands before that block's last wait ends.
}

// Tagged words: relaxed (single-copy atomic, gpu-scope) 16-byte loads and stores of 4 words.
// On cudasim: relaxed atomics, and a poll that waits (cudasim::wait_word) instead of spinning.
__device__ __forceinline__ uint4 ld_relaxed16(const uint4* p) {
#ifdef __CUDA_SIM__
  const unsigned* w = reinterpret_cast<const unsigned*>(p);
  return make_uint4(::cudasim::load_relaxed(w), ::cudasim::load_relaxed(w + 1),
                    ::cudasim::load_relaxed(w + 2), ::cudasim::load_relaxed(w + 3));
#else
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.b32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
#endif
}

__device__ __forceinline__ void st_relaxed16(uint4* p, const uint4& v) {
#ifdef __CUDA_SIM__
  unsigned* w = reinterpret_cast<unsigned*>(p);
  ::cudasim::store_relaxed(w, v.x);
  ::cudasim::store_relaxed(w + 1, v.y);
  ::cudasim::store_relaxed(w + 2, v.z);
  ::cudasim::store_relaxed(w + 3, v.w);
#else
  asm volatile("st.relaxed.gpu.global.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#endif
}

constexpr uint32_t kTagMask = 0xFFFF0000u;

// Step s's tag: s + 1 in the high half, so a zeroed buffer matches no step before 65535 (and
// by then each buffer holds the step two before).
__device__ __forceinline__ uint32_t step_tag(int s) { return static_cast<uint32_t>(s + 1) << 16; }

__device__ __forceinline__ bool has_tag(const uint4& v, uint32_t tag) {
  return ((v.x & kTagMask) == tag) & ((v.y & kTagMask) == tag) & ((v.z & kTagMask) == tag) &
         ((v.w & kTagMask) == tag);
}

// Before a reload of a chunk that lacked the tag: nothing on a GPU (the loop spins on L2);
// cudasim's thread sleeps until every word of the chunk holds it.
__device__ __forceinline__ void poll_pause(const uint4* p, uint32_t tag) {
#ifdef __CUDA_SIM__
  const unsigned* w = reinterpret_cast<const unsigned*>(p);
  for (int j = 0; j < 4; ++j) ::cudasim::wait_word(w + j, kTagMask, tag);
#else
  (void)p;
  (void)tag;
#endif
}

// Chunk c of step s's tagged buffer: the low halves of its expected words, under the tag.
__device__ __forceinline__ uint4 tagged_chunk(uint32_t salt, int step, uint32_t c) {
  const uint4 v = chunk_value(salt, step, c);
  const uint32_t tag = step_tag(step);
  return make_uint4(tag | (v.x & 0xFFFFu), tag | (v.y & 0xFFFFu), tag | (v.z & 0xFFFFu),
                    tag | (v.w & 0xFFFFu));
}

// Tagged exchange over the grid, no barrier in the step ("exchange grid-tagged" above): the
// step-s buffer is n16 chunks of 4 tagged words in `exchange`, one per step parity; every
// block keeps the 4 n16 values, two to a word, in shared memory. Double buffering as in
// exchange_dsmem_kernel, ordered by the data alone: a block rewrites a buffer (step s + 2) only
// after it has read all of step s + 1 (the __syncthreads ending each step puts every read of a
// step before any of the block's writes of the next), and every block writes its share of
// step s + 1 only after it has read all of step s. In the RNN kernels the recurrence gives the
// same order. A nonzero `salt` checks every value.
__global__ void __launch_bounds__(kThreads, 1)
    exchange_tagged_kernel(uint4* exchange, uint32_t n16, int steps, uint32_t salt,
                           unsigned* errors) {
  constexpr int kInFlight = 8;
  unsigned* stage = dynamic_smem<unsigned>();  // 2 n16 words: chunk c's values at 2c, 2c + 1
  uint32_t first, last;
  share(n16, blockIdx.x, gridDim.x, &first, &last);
  for (int s = 0; s < steps; ++s) {
    uint4* buf = exchange + (size_t)(s & 1) * n16;
    const uint32_t tag = step_tag(s);
    for (uint32_t c = first + threadIdx.x; c < last; c += blockDim.x)
      st_relaxed16(buf + c, tagged_chunk(salt, s, c));
    for (uint32_t c0 = threadIdx.x; c0 < n16; c0 += kInFlight * blockDim.x) {
      uint4 v[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        const uint32_t c = c0 + k * blockDim.x;
        if (c < n16) v[k] = ld_relaxed16(buf + c);
      }
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        const uint32_t c = c0 + k * blockDim.x;
        if (c >= n16) continue;
        while (!has_tag(v[k], tag)) {
          poll_pause(buf + c, tag);
          v[k] = ld_relaxed16(buf + c);
        }
        stage[2 * c] = (v[k].x & 0xFFFFu) | (v[k].y << 16);
        stage[2 * c + 1] = (v[k].z & 0xFFFFu) | (v[k].w << 16);
      }
    }
    __syncthreads();
    if (salt) {
      unsigned bad = 0;
      for (uint32_t c = threadIdx.x; c < n16; c += blockDim.x) {
        const uint4 e = chunk_value(salt, s, c);
        bad += (stage[2 * c] != ((e.x & 0xFFFFu) | (e.y << 16))) +
               (stage[2 * c + 1] != ((e.z & 0xFFFFu) | (e.w << 16)));
      }
      if (bad) atomicAdd(errors, bad);
    }
    __syncthreads();  // the stage is rewritten, and the other buffer written, next step
  }
}

// ---- instruction fetch ---------------------------------------------------------------------

// A persistent kernel's step runs thousands of instructions of straight-line code once each
// (the stage copy, the tiles' set-up, the epilogue's cell), not a loop that stays in the
// instruction caches, and the RNN kernels are 100-200 KB of code each (sm_90). This kernel
// prices that: `steps` passes through kInstr independent FFMAs (eight accumulators, so no
// instruction waits on a result). While the pass fits in a cache it issues at the scheduler's
// rate (one instruction a cycle: 1 cycle per instruction and warp with one warp an SM, 2 with
// eight, two warps to each of the four schedulers); once it outgrows one, every pass fetches
// its code again from the next level, and the cycles per instruction say what that costs.
template <int kInstr>
__global__ void __launch_bounds__(kThreads, 1)
    fetch_kernel(int steps, float seed, float* out, long long* cycles) {
  float acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = seed + static_cast<float>(i + threadIdx.x);
  const float a = 1.0f + 1e-7f * seed, b = 1e-7f;
  const long long start = clock64();
  for (int s = 0; s < steps; ++s) {
#pragma unroll
    for (int i = 0; i < kInstr; ++i) {
#ifdef __CUDA_SIM__
      acc[i & 7] = fmaf(acc[i & 7], a, b);
#else
      asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(acc[i & 7]) : "f"(a), "f"(b));
#endif
    }
  }
  const long long stop = clock64();
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += acc[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;  // keeps every FFMA
  if (blockIdx.x == 0 && threadIdx.x == 0) *cycles = stop - start;
}

// ---- host ----------------------------------------------------------------------------------

std::string clusters_note(int n) { return std::to_string(n) + (n == 1 ? " cluster" : " clusters"); }

struct Row {
  std::string what;
  int blocks;
  long bytes;   // per block per step: what it reads (global) or receives (DSMEM)
  double us;    // per step; negative: not timed (--check-only)
  long errors;  // -1: not checked
  std::string note;
};

// Median over `reps` of (time of `steps` steps - time of 0 steps) / steps, in microseconds.
template <class Steps>
double time_per_step(Steps run_steps, int steps, int reps = 5) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  auto run = [&](int n) {
    CHECK(cudaEventRecord(a));
    run_steps(n);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    return 1000.0 * ms;
  };
  run(steps);  // warm-up
  std::vector<double> per;
  for (int r = 0; r < reps; ++r) {
    const double full = run(steps), empty = run(0);
    per.push_back((full - empty) / steps);
  }
  std::sort(per.begin(), per.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return per[per.size() / 2];
}

// Runs run_steps(steps, salt) once, checked, with a salt no earlier launch used, and returns
// the number of words its blocks received wrong.
template <class Steps>
long checked_errors(Steps run_steps, int steps, unsigned* errors) {
  static uint32_t salt = 0;
  CHECK(cudaMemset(errors, 0, sizeof(unsigned)));
  run_steps(steps, ++salt);
  CHECK(cudaDeviceSynchronize());
  unsigned bad = 0;
  CHECK(cudaMemcpy(&bad, errors, sizeof bad, cudaMemcpyDeviceToHost));
  return static_cast<long>(bad);
}

// A launch of `blocks` blocks with one attribute: cooperative (cluster 0: grid.sync allowed) or
// clusters of `cluster` blocks. `attr` must outlive the returned config.
cudaLaunchConfig_t launch_config(int blocks, int cluster, size_t smem, cudaLaunchAttribute* attr) {
  *attr = {};
  if (cluster == 0) {
    attr->id = cudaLaunchAttributeCooperative;
    attr->val.cooperative = 1;
  } else {
    attr->id = cudaLaunchAttributeClusterDimension;
    attr->val.clusterDim.x = static_cast<unsigned>(cluster);
    attr->val.clusterDim.y = 1;
    attr->val.clusterDim.z = 1;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// One launch: cooperative when `cluster` is 0, else in clusters of `cluster` blocks.
template <typename... Exp, typename... Act>
void launch(void (*kernel)(Exp...), int blocks, int cluster, size_t smem, Act&&... args) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config(blocks, cluster, smem, &attr);
  CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Act>(args)...));
  CHECK(cudaGetLastError());
}

// A plain launch (not cooperative, no clusters) of `blocks` blocks of `threads` threads.
template <typename... Exp, typename... Act>
void launch_plain(void (*kernel)(Exp...), int blocks, int threads, Act&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Act>(args)...));
  CHECK(cudaGetLastError());
}

// How many clusters of `size` blocks the device holds at once with `smem` bytes each (0: none).
int max_clusters(const void* kernel, int size, size_t smem) {
  if (size > 8 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
          cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config(size, size, smem, &attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void allow_smem(const void* kernel, size_t smem) {
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)));
}

int main(int argc, char** argv) {
  bool check_only = false;
  const char* table_path = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--check-only") {
      check_only = true;
    } else if (argv[i][0] == '-' || table_path != nullptr) {
      std::fprintf(stderr, "usage: %s [--check-only] [TABLE.md]\n", argv[0]);
      return 2;
    } else {
      table_path = argv[i];
    }
  }
  int dev = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  const int sms = prop.multiProcessorCount;
  const size_t smem_max = prop.sharedMemPerBlockOptin;
  std::vector<Row> rows;
  unsigned* errors = nullptr;
  CHECK(cudaMalloc(&errors, sizeof(unsigned)));
  const int steps = 2000;
  // Checked steps: enough for each double buffer to be rewritten twice.
  const int check_steps = check_only ? 6 : 50;
  // The time of `steps` steps of launch(n), or -1 (not timed) with --check-only, where the
  // launch still runs, for 2 steps, so its setup is exercised.
  auto timed = [&](auto&& launch_steps) {
    if (check_only) {
      launch_steps(2);
      CHECK(cudaDeviceSynchronize());
      return -1.0;
    }
    return time_per_step(launch_steps, steps);
  };

  // grid.sync at one and two blocks per SM (ANCHORS.md: 1.12 and 1.30 us on an H100).
  for (int per_sm : {1, 2}) {
    int fit = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &fit, (const void*)grid_sync_kernel, kThreads, 0));
    if (fit < per_sm) continue;
    const int blocks = per_sm * sms;
    const double us = timed([&](int n) { launch(grid_sync_kernel, blocks, 0, 0, n); });
    rows.push_back({"grid.sync", blocks, 0, us, -1, per_sm == 1 ? "1 block/SM" : "2 blocks/SM"});
  }

  const bool clusters_ok = prop.major >= 9;
  if (clusters_ok) {
    for (int c : {2, 4, 8, 16}) {
      // At most sms / c clusters: one block per SM, as the RNN kernels run (none on a device
      // with fewer SMs than the cluster, whatever the occupancy query says).
      const int clusters = std::min(max_clusters((const void*)cluster_sync_kernel, c, 0), sms / c);
      if (clusters == 0) {
        rows.push_back({"cluster.sync c=" + std::to_string(c), 0, 0, -1, -1, "not launchable"});
        continue;
      }
      const double us =
          timed([&](int k) { launch(cluster_sync_kernel, clusters * c, c, 0, k); });
      rows.push_back({"cluster.sync c=" + std::to_string(c), clusters * c, 0, us, -1,
                      clusters_note(clusters)});
    }
  }

  // Exchange sizes per block per step: S5's h (8 x 256 x 2 B = 4 KB) up to S1's backward
  // dgates (16 x 3072 x 2 B = 96 KB) and beyond.
  const long sizes[] = {4 << 10, 16 << 10, 48 << 10, 96 << 10, 192 << 10};
  uint4* exchange = nullptr;
  CHECK(cudaMalloc(&exchange, (size_t)2 * sms * (192 << 10)));  // 2 parities x groups x X

  for (long x : sizes) {
    const uint32_t n16 = static_cast<uint32_t>(x / 16);
    if ((size_t)x > smem_max) continue;
    const void* k = (const void*)exchange_global_kernel<false>;
    allow_smem(k, x);
    int fit = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, k, kThreads, x));
    if (fit < 1) continue;
    auto run = [&](int n, uint32_t salt) {
      launch(exchange_global_kernel<false>, sms, 0, x, exchange, n16, n, salt, errors);
    };
    const long bad = checked_errors(run, check_steps, errors);
    const double us = timed([&](int n) { run(n, 0); });
    rows.push_back({"exchange grid", sms, x, us, bad, "write share, grid.sync, cp.async all"});
  }

  // The tagged exchange: X bytes of values as 2X bytes of words (4X for the two buffers, which
  // `exchange` holds), zeroed before every launch so that no word left by an earlier launch
  // carries a step's tag (the memset is in the timed launches and the empty ones alike).
  for (long x : sizes) {
    const uint32_t n16 = static_cast<uint32_t>(2 * x / 16);
    if ((size_t)x > smem_max || (size_t)4 * x > (size_t)2 * sms * (192 << 10)) continue;
    const void* k = (const void*)exchange_tagged_kernel;
    allow_smem(k, x);
    int fit = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, k, kThreads, x));
    if (fit < 1) continue;
    auto run = [&](int n, uint32_t salt) {
      CHECK(cudaMemset(exchange, 0, (size_t)2 * n16 * 16));
      launch(exchange_tagged_kernel, sms, 0, x, exchange, n16, n, salt, errors);
    };
    const long bad = checked_errors(run, check_steps, errors);
    const double us = timed([&](int n) { run(n, 0); });
    rows.push_back({"exchange grid-tagged", sms, x, us, bad,
                    "tagged words (reads 2x the bytes): write share, poll all, no barrier"});
  }

  if (clusters_ok) {
    for (int c : {4, 8, 16}) {
      for (long x : sizes) {
        const uint32_t n16 = static_cast<uint32_t>(x / 16);
        // 0: through global memory, 1: DSMEM and the cluster barrier, 2: DSMEM and mbarriers
        for (int kind = 0; kind < 3; ++kind) {
          const size_t smem = kind == 0 ? (size_t)x : 2 * (size_t)x + (kind == 2 ? 16 : 0);
          if (smem > smem_max) continue;
          const void* k = kind == 0   ? (const void*)exchange_global_kernel<true>
                          : kind == 1 ? (const void*)exchange_dsmem_kernel
                                      : (const void*)exchange_mbarrier_kernel;
          allow_smem(k, smem);
          const int clusters = std::min(max_clusters(k, c, smem), sms / c);  // as above
          const char* names[] = {"exchange cluster-global", "exchange dsmem",
                                 "exchange dsmem-mbarrier"};
          const std::string what = std::string(names[kind]) + " c=" + std::to_string(c);
          if (clusters == 0) {
            rows.push_back({what, 0, x, -1, -1, "not launchable"});
            continue;
          }
          auto run = [&](int steps_, uint32_t salt) {
            if (kind == 0) {
              launch(exchange_global_kernel<true>, clusters * c, c, smem, exchange, n16,
                     steps_, salt, errors);
            } else if (kind == 1) {
              launch(exchange_dsmem_kernel, clusters * c, c, smem, n16, steps_, salt, errors);
            } else {
              launch(exchange_mbarrier_kernel, clusters * c, c, smem, n16, steps_, salt, errors);
            }
          };
          const long bad = checked_errors(run, check_steps, errors);
          const double us = timed([&](int s) { run(s, 0); });
          rows.push_back({what, clusters * c, x, us, bad, clusters_note(clusters)});
        }
      }
    }
  }
  CHECK(cudaFree(exchange));
  CHECK(cudaFree(errors));

  // Instruction fetch: passes of 512 to 16384 straight-line FFMAs (8 to 256 KB of code), with
  // one warp and with eight warps an SM (fetch_kernel); "us per step" is one pass. The cycles
  // come from clock64() around 200 passes in block 0's thread 0.
  constexpr int kFetchPasses = 200;
  float* fetch_out = nullptr;
  long long* fetch_cycles = nullptr;
  CHECK(cudaMalloc(&fetch_out, (size_t)sms * kThreads * sizeof(float)));
  CHECK(cudaMalloc(&fetch_cycles, sizeof(long long)));
  const auto fetch_rows = [&](auto kernel, int instr) {
    for (int warps : {1, 8}) {
      const auto run = [&](int n) {
        launch_plain(kernel, sms, 32 * warps, n, 1.0f, fetch_out, fetch_cycles);
      };
      std::string note = warps == 1 ? "1 warp/SM" : std::to_string(warps) + " warps/SM";
      double us = -1;
      if (check_only) {
        run(1);
        CHECK(cudaDeviceSynchronize());
      } else {
        us = time_per_step(run, kFetchPasses);
        run(kFetchPasses);
        long long cycles = 0;
        CHECK(cudaMemcpy(&cycles, fetch_cycles, sizeof cycles, cudaMemcpyDeviceToHost));
        char buf[96];
        std::snprintf(buf, sizeof buf, ", %.2f cycles per instruction and warp (ideal %d)",
                      static_cast<double>(cycles) / (static_cast<double>(kFetchPasses) * instr),
                      warps == 1 ? 1 : 2);
        note += buf;
      }
      rows.push_back({"fetch " + std::to_string(instr * 16 / 1024) + " KB", sms, 0, us, -1, note});
    }
  };
  fetch_rows(fetch_kernel<512>, 512);
  fetch_rows(fetch_kernel<1024>, 1024);
  fetch_rows(fetch_kernel<2048>, 2048);
  fetch_rows(fetch_kernel<4096>, 4096);
  fetch_rows(fetch_kernel<8192>, 8192);
  fetch_rows(fetch_kernel<16384>, 16384);
  CHECK(cudaFree(fetch_out));
  CHECK(cudaFree(fetch_cycles));

  std::string table;
  char line[512];
  std::snprintf(line, sizeof line,
                "# Step primitives on %s (%d SMs, cc %d.%d), %s\n\n"
                "| primitive | blocks | KB per block per step | us per step | errors | note |\n"
                "|---|---|---|---|---|---|\n",
                prop.name, sms, prop.major, prop.minor,
                check_only ? "checked passes only (not timed)"
                           : "2000 steps per timing (a fetch row: 200 passes), median of 5");
  table += line;
  long total_errors = 0;
  for (const Row& r : rows) {
    char us_text[32] = "-";
    if (r.us >= 0) std::snprintf(us_text, sizeof us_text, "%.4g", r.us);  // rounded
    const std::string us = us_text;
    std::snprintf(line, sizeof line, "| %s | %d | %g | %s | %s | %s |\n", r.what.c_str(),
                  r.blocks, r.bytes / 1024.0, us.c_str(),
                  r.errors < 0 ? "-" : std::to_string(r.errors).c_str(), r.note.c_str());
    table += line;
    if (r.errors > 0) total_errors += r.errors;
  }
  std::fputs(table.c_str(), stdout);
  if (table_path != nullptr) {
    FILE* f = std::fopen(table_path, "w");
    if (!f) {
      std::perror(table_path);
      return 1;
    }
    std::fputs(table.c_str(), f);
    std::fclose(f);
  }
  if (total_errors) std::fprintf(stderr, "microbench: %ld mismatched words\n", total_errors);
  return total_errors ? 1 : 0;
}
