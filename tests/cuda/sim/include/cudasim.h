// cudasim: just enough of CUDA to run csrc/'s kernels, unchanged, on the CPU (and the
// standalone benchmarks/microbench.cu, host code included: tests/cuda/test_microbench.py).
//
// The kernel sources include <cuda_runtime.h>, <cuda_bf16.h>, <cuda_fp16.h>, <mma.h> and
// <cooperative_groups.h>; this directory's headers of those names all include this file, so
// `g++ -I tests/cuda/sim/include` compiles csrc/*.cu as plain C++20.
//
// Execution model (runtime.cpp): every CUDA thread of a launch is a fiber with its own stack,
// and one runs at a time. The scheduler switches to a thread, which runs until its next barrier
// (__syncthreads, grid.sync, cluster.sync), a wait (an mbarrier phase, a tagged word) or its
// end, then switches back. Between two barriers
// the threads therefore run one after another in an order the scheduler picks (ascending,
// descending or a seeded shuffle), and blocks (clusters) are released from their barriers one at
// a time, so they drift apart as far as grid.sync (cluster.sync) allows: in a cluster launch
// one cluster may run to its end before another starts. A kernel whose result depends on that
// order has a race, so running it under several orders and comparing bit for bit is a race
// check. Barrier misuse (a block, grid or cluster barrier not reached by every thread it spans,
// threads of one block waiting at different barriers, grid.sync outside a cooperative launch,
// cluster.sync outside a cluster launch) fails the launch with a message instead of hanging.
//
// What is checked beyond the results (an abort names the rule):
//   * dynamic shared memory is allocated at exactly the launch's size, filled with 0xFF (NaN)
//     bytes, and its size must fit the kernel's MaxDynamicSharedMemorySize attribute (48 KiB
//     unless raised) and the device's opt-in limit, as on a GPU;
//   * WMMA pointers must be 32-byte aligned and ldm a multiple of 16 bytes (the PTX rule);
//   * a cooperative grid must fit on the device at once (occupancy from shared memory; a block
//     needing more dynamic shared memory than the kernel's attribute allows counts as none, as
//     in CUDA's occupancy calculator, so a query before the limit is raised says "no room");
//   * a failed runtime call leaves its error pending in cudaGetLastError, as CUDA's do, and
//     sim_api's entry points fail when one that succeeded left an error of its own pending
//     (torch's next launch check would raise it); sim_refuse makes the device refuse the
//     cluster calls a GPU may refuse, so the launcher's fallbacks run here too;
//   * built with -fsanitize=address,undefined, out-of-bounds accesses to global memory (torch
//     tensors under LD_PRELOAD=libasan) and to shared memory, and misaligned float4 loads;
//   * every L2 prefetch address must be readable (it becomes a one-byte read);
//   * in a cluster launch, a block's shared memory must be as it was when the block exited at
//     the launch's end (a peer that stores into it after it exited, which on a GPU is gone).
//   * built with -DCUDASIM_TSAN=1 and the kernels with -fsanitize=thread (simulate.py), every
//     simulated thread is a ThreadSanitizer fiber ordered only by the launch, the barriers and
//     mbarrier phases: two accesses to the same bytes, one a write, that no barrier orders are
//     reported as a data race with both stacks (runtime.cpp), in any memory the kernels touch
//     (but for the relaxed atomics of tagged words, which order nothing: wait_word).
// A cudaLaunchKernelExC launch that ran and broke a rule returns success, as on a GPU, and the
// failure comes back at the next synchronization (or sim_api's entry point): an error from the
// launch call would read as a refusal, and the launcher would rerun the plan as a plain grid.
//
// Numerics: WMMA multiplies the stored bf16/fp16 operands exactly and accumulates in fp32, in
// k order; TF32 operands are truncated to 10 mantissa bits as the tensor cores do (the kernels
// round them first with __float_to_tf32, round-to-nearest with ties away from zero).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ThreadSanitizer's switch for accesses it must not count (CUDASIM_TSAN; see prefetch, WarpAccess).
#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

// ---- keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __CUDA_SIM__ 1

// ---- types and thread coordinates -----------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace cudasim {
[[noreturn]] void fail(const char* fmt, ...);
void block_barrier(const char* file, int line);  // __syncthreads
void grid_barrier();                              // cooperative_groups grid sync
void cluster_barrier();                           // cooperative_groups cluster sync
unsigned char* dynamic_smem();                    // this block's dynamic shared memory
// clock64() and %globaltimer: one shared counter, +1 per read (monotonic; durations are counts
// of clock reads, not time).
long long tick();
void cp_async(void* dst, const void* src, size_t bytes);  // cp.async.cg (see runtime.cpp)
void cp_async_commit();                                   // cp.async.commit_group
void cp_async_wait(int pending);                          // cp.async.wait_group pending
inline long long global_ns() { return tick(); }
// A warp's wmma::mma_sync (counted once, by lane 0): lets tests see how many tile products a
// launch multiplied (mma_count()), which the results alone do not show for padding tiles.
void count_mma();
long long mma_count();
// A warp's accumulator store (wmma::store_matrix_sync, counted by lane 0), and of those the ones
// through the .shared form (store_shared below): lets tests see which form a launch's matmuls
// took, which the results do not show.
void count_frag_store(bool shared);
long long frag_store_count(bool shared);
// A thread's batch of points in the epilogue (rnn_common.cuh run_points, one count a thread and
// batch): lets tests see that a launch took the batched path, which the results do not show.
void count_point_batch();
long long point_batch_count();
// Thread-block clusters: this block's rank, the cluster's size, and a peer's copy of a pointer
// into this block's dynamic shared memory (cluster_group::map_shared_rank, DSMEM).
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
void* cluster_map_shared(const void* p, unsigned rank);
// mbarriers with transaction counts, and st.async into a peer's shared memory (sm_90; only
// benchmarks/microbench.cu uses them): init, arrive.expect_tx, try_wait.parity in a loop (the
// thread waits until the phase of that parity completes), st.async.mbarrier::complete_tx
// (dst and bar both in one block of the cluster, e.g. from map_shared_rank).
void mbarrier_init(void* bar, unsigned count);
void mbarrier_arrive_expect_tx(void* bar, unsigned bytes);
void mbarrier_wait_parity(const void* bar, unsigned parity);
void st_async(void* dst, const void* src, size_t bytes, void* bar);
// Words that carry their own step tag (benchmarks/microbench.cu's barrier-free exchange, after
// NCCL's low-latency protocol): stored and loaded whole as relaxed atomics (st/ld.relaxed.gpu;
// here __atomic, so ThreadSanitizer counts them as atomics, not as a race, and orders nothing by
// them), and a thread polling a word until (word & mask) == want waits in wait_word instead of
// spinning: it sleeps until no thread can run and no barrier can be released, then wakes if a
// store has made the word so (as late as a GPU allows: a slow reader). A wait that no thread
// can end fails the launch as a deadlock.
inline unsigned load_relaxed(const unsigned* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline void store_relaxed(unsigned* p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
void wait_word(const unsigned* p, unsigned mask, unsigned want);
// What a launch ran, read off its params before its threads start (tests/cuda/sim/kernels.cpp
// describe), for sim_api's last_launch; nullptr: not recorded.
using Describe = std::vector<int> (*)(void** args);
void register_kernel(const void* func, void (*invoke)(const void* func, void** args),
                     Describe describe = nullptr);
// How to call a kernel of parameter types A... with a launch's argument array.
template <typename... A, size_t... I>
void invoke_unpacked(const void* f, void** args, std::index_sequence<I...>) {
  reinterpret_cast<void (*)(A...)>(const_cast<void*>(f))(*static_cast<std::decay_t<A>*>(args[I])...);
}
template <typename... A>
void invoke_args(const void* f, void** args) {
  invoke_unpacked<A...>(f, args, std::index_sequence_for<A...>{});
}
// prefetch.global.L2: a hint on a GPU; here the address must be readable (ASan checks it). It
// reads nothing a thread sees, so ThreadSanitizer does not count it as a read.
inline void prefetch(const void* p) {
#if defined(__SANITIZE_THREAD__)
  __tsan_ignore_thread_begin();
#endif
  (void)*static_cast<const volatile unsigned char*>(p);
#if defined(__SANITIZE_THREAD__)
  __tsan_ignore_thread_end();
#endif
}
}  // namespace cudasim

#define __syncthreads() ::cudasim::block_barrier(__FILE__, __LINE__)
inline long long clock64() { return ::cudasim::tick(); }
// One fiber runs at a time and switches only at barriers, so any add is atomic here; this one
// is also atomic to ThreadSanitizer (CUDASIM_TSAN), which reports plain adds of two threads.
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

// ---- runtime API (the subset launch_cooperative and launch_clusters use) ----------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidDevice = 101,
  cudaErrorNotSupported = 801,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorLaunchFailure = 719,
  cudaErrorClusterOutOfResources = 908,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
enum cudaLaunchAttributeID { cudaLaunchAttributeCooperative = 2, cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  int cooperative;
  struct {
    unsigned int x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
namespace cudasim {
// Streams are names here: every launch runs to its end before it returns, on whatever stream it
// names. The current stream is the one c10's getCurrentCUDAStream gives the host build of
// csrc/binding.cpp (sim/host/c10/cuda/CUDAStream.h), set by the test (sim_api.h
// set_current_stream; nullptr, the legacy default stream, unless set); each launch counts as on
// it or off it, so a launch that names another stream (0, say) shows.
cudaStream_t current_stream();
// Devices: cudasim simulates one, device 0, which holds all of its memory. A test may make
// another the calling thread's current device (sim_api.h set_current_device: the caller's
// current GPU is not the one its tensors are on), which only cudaSetDevice(0) leaves; while it
// is current, every call that acts on the current device (a function's attributes, occupancy,
// a launch) fails with cudaErrorInvalidDevice. c10's device guard in the host build of the
// binding (sim/host/c10/cuda/CUDAGuard.h) makes device 0 current and restores the caller's.
void set_current_device(int device);
}  // namespace cudasim
// The fields of the real struct that csrc reads: the virtual architecture the function was
// compiled for (major*10+minor: a build without sm_90 code reports 80 on an H100, where the
// cluster branches are compiled out) and its static shared memory (csrc has none).
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int binaryVersion, ptxVersion, maxDynamicSharedSizeBytes;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorImpl(int* blocks, const void* func,
                                                              int block_size, size_t smem);
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel func,
                                                          int block_size, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorImpl(
      blocks, reinterpret_cast<const void*>(func), block_size, smem);
}
cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args,
                                        size_t smem, cudaStream_t stream);
// Cluster launches: a cluster of at most 8 blocks (16 with the non-portable attribute), the
// grid a multiple of it, cooperative (grid.sync() allowed) with cudaLaunchAttributeCooperative;
// how many clusters fit at once is Config::max_clusters, or by occupancy (sms / cluster size,
// shared memory permitting) when that is negative.
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* config, const void* func, void** args);
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void* func,
                                           const cudaLaunchConfig_t* config);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t err);

// The typed launch (any kernel signature): registers how to call the kernel, then launches it.
template <typename... Exp, typename... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Exp...),
                               Act&&... args) {
  const void* func = reinterpret_cast<const void*>(kernel);
  ::cudasim::register_kernel(func, &::cudasim::invoke_args<Exp...>);
  std::tuple<std::decay_t<Exp>...> values(std::forward<Act>(args)...);
  return std::apply(
      [&](auto&... v) {
        void* ptrs[] = {static_cast<void*>(&v)...};
        return cudaLaunchKernelExC(config, func, ptrs);
      },
      values);
}

// ---- what a standalone program adds (benchmarks/microbench.cu's host code) -------------------
// Launches run to their end before they return, so memory calls and events need no ordering;
// "device" memory is host memory; an event records cudasim's clock (durations are counts).
struct cudaDeviceProp {
  char name[256];
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
  int major, minor;
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
struct CUevent_st;
using cudaEvent_t = CUevent_st*;
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaMallocBytes(void** p, size_t bytes);
template <typename T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMallocBytes(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaDeviceSynchronize();
const char* cudaGetErrorString(cudaError_t err);  // a failed launch: cudasim's message
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t event);

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- fp16 / bf16 -----------------------------------------------------------------------------
struct __half {
  _Float16 v;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
// Every fp16 value converted once at load time: without F16C, g++ converts _Float16 through a
// libgcc call, which was half the simulator's time on fp16 cases. Exact either way (every
// fp16 value is a float), NaN payloads included.
namespace cudasim {
inline const std::array<float, 65536> kHalfToFloat = [] {
  std::array<float, 65536> table{};
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    _Float16 h;
    std::memcpy(&h, &b, 2);
    table[bits] = static_cast<float>(h);
  }
  return table;
}();
}  // namespace cudasim
inline float __half2float(__half h) {
  uint16_t bits;
  std::memcpy(&bits, &h.v, 2);
  return ::cudasim::kHalfToFloat[bits];
}
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }  // RNE
inline unsigned short __half_as_ushort(__half h) {
  unsigned short bits;
  std::memcpy(&bits, &h.v, 2);
  return bits;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __bfloat162float(__nv_bfloat16 b) {
  return __uint_as_float(static_cast<uint32_t>(b.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ---- cooperative groups ----------------------------------------------------------------------
namespace cooperative_groups {
struct grid_group {
  void sync() const { ::cudasim::grid_barrier(); }
};
inline grid_group this_grid() { return grid_group{}; }
struct cluster_group {
  void sync() const { ::cudasim::cluster_barrier(); }
  unsigned block_rank() const { return ::cudasim::cluster_block_rank(); }
  unsigned num_blocks() const { return ::cudasim::cluster_num_blocks(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(::cudasim::cluster_map_shared(p, rank));
  }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

// ---- WMMA -------------------------------------------------------------------------------------
// A fragment holds its whole tile in every lane (the real one spreads it over the warp's 32
// lanes in an unspecified layout). The kernels only load, store, fill and convert fragments
// element-wise, so each lane holding the whole tile behaves like the warp. Lane 0 alone
// multiplies and stores, for speed -- the other lanes would store the same values, and no lane
// reads a tile's output before a barrier. So only lane 0's loaded values reach memory: every
// lane has its pointers checked, but the others read the tile only under AddressSanitizer
// (which then checks each lane's reads); elsewhere their fragments are zeroed (the reads were
// a fifth of a simulated launch's time).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T> struct element { using type = T; };
template <> struct element<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K> struct tile_dims;
template <int M, int N, int K> struct tile_dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct tile_dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct tile_dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename element<T>::type;
  using storage_type = T;
  using layout = Layout;
  static constexpr int rows = tile_dims<Use, M, N, K>::rows;
  static constexpr int cols = tile_dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // (r, c) at x[r * cols + c]
  // 16-bit operands converted once at load (mma_sync reads these, not x).
  float xf[std::is_same_v<element_type, float> ? 1 : num_elements];
};

inline bool is_lane0() { return (threadIdx.x & 31u) == 0; }

// Under ThreadSanitizer (CUDASIM_TSAN) a warp's WMMA accesses to memory are lane 0's: lane 0
// alone stores a tile here, so the other lanes' loads of it would read as races with lane 0
// that the real layout, where each lane loads the elements it stored, does not have. Any other
// thread's access to the tile is still checked against lane 0's.
struct WarpAccess {
#if defined(__SANITIZE_THREAD__)
  const bool other_lane = !is_lane0();
  WarpAccess() {
    if (other_lane) __tsan_ignore_thread_begin();
  }
  ~WarpAccess() {
    if (other_lane) __tsan_ignore_thread_end();
  }
#endif
};

// A lane other than 0 skips a fragment's load (see above), its fragment zeroed; under
// AddressSanitizer no lane skips.
inline bool skip_other_lane(void* x, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  (void)x;
  (void)bytes;
  return false;
#else
  if (is_lane0()) return false;
  std::memset(x, 0, bytes);
  return true;
#endif
}

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32: nearest, ties away from zero
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (!std::isfinite(f)) return f;
  u = (u + 0x1000u) & ~0x1FFFu;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float truncate_tf32(float f) {  // what the tensor core reads of an fp32 operand
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= ~0x1FFFu;
  std::memcpy(&f, &u, 4);
  return f;
}

void check_pointer(const void* p, unsigned ldm_bytes, const char* what);

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_pointer(p, ldm * sizeof(P), "load_matrix_sync");
  if (skip_other_lane(f.x, sizeof f.x)) return;
  [[maybe_unused]] const WarpAccess warp;
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const P v = row ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
      f.x[r * F::cols + c] = v;
      if constexpr (!std::is_same_v<typename F::element_type, float>) f.xf[r * F::cols + c] = to_f(v);
    }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  check_pointer(p, ldm * sizeof(float), "store_matrix_sync");
  if (!is_lane0()) return;
  ::cudasim::count_frag_store(false);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]) =
          f.x[r * N + c];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                      layout_t layout) {
  check_pointer(p, ldm * sizeof(float), "load_matrix_sync");
  if (skip_other_lane(f.x, sizeof f.x)) return;
  [[maybe_unused]] const WarpAccess warp;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  if (!is_lane0()) return;
  ::cudasim::count_mma();
  float av[M * K], bv[K * N];
  for (int i = 0; i < M * K; ++i) {
    if constexpr (std::is_same_v<T, precision::tf32>) av[i] = truncate_tf32(a.x[i]);
    else av[i] = a.xf[i];
  }
  for (int i = 0; i < K * N; ++i) {
    if constexpr (std::is_same_v<T, precision::tf32>) bv[i] = truncate_tf32(b.x[i]);
    else bv[i] = b.xf[i];
  }
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc += av[m * K + k] * bv[k * N + n];  // exact products
      out[m * N + n] = acc;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

// The .shared forms of wmma.load / wmma.store (rnn_common.cuh frag_load: the kernels' own PTX on
// a GPU, where the address is the 32-bit shared address of the pointer): the same as WMMA's, but
// every element the warp reads or writes must lie in this block's dynamic shared memory. On a
// GPU an address outside it is not an error: it reads or writes some other shared memory.
namespace cudasim {
bool is_shared(const void* p);  // p is in this block's dynamic shared memory
// [p, p + bytes) lies in this block's dynamic shared memory, else the launch fails naming `what`.
void require_shared(const void* p, size_t bytes, const char* what);
// Every element of a rows x cols tile at p (leading dimension ldm; `row`: row-major, else
// column-major) lies in this block's dynamic shared memory. Its elements lie between its first
// (p) and its last, so checking that span decides it for all of them: one check a fragment, not
// one an element (those calls were half of a simulated WMMA launch's time).
template <typename P>
void require_shared_tile(const P* p, int rows, int cols, unsigned ldm, bool row,
                         const char* what) {
  const size_t last = row ? (size_t)(rows - 1) * ldm + (cols - 1)
                          : (size_t)(cols - 1) * ldm + (rows - 1);
  require_shared(p, (last + 1) * sizeof(P), what);
}
template <typename F, typename P>
void load_shared(F& f, const P* p, unsigned ldm) {
  using Layout = typename F::layout;
  constexpr bool row = std::is_same_v<Layout, nvcuda::wmma::row_major>;
  require_shared_tile(p, F::rows, F::cols, ldm, row, "wmma.load .shared");
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
}
template <int M, int N, int K>
void load_shared(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, M, N, K, float>& f,
                 const float* p, unsigned ldm) {
  require_shared_tile(p, M, N, ldm, true, "wmma.load.c .shared");
  nvcuda::wmma::load_matrix_sync(f, p, ldm, nvcuda::wmma::mem_row_major);
}
template <int M, int N, int K>
void store_shared(float* p, const nvcuda::wmma::fragment<nvcuda::wmma::accumulator, M, N, K, float>& f,
                  unsigned ldm) {
  require_shared_tile(p, M, N, ldm, true, "wmma.store.d .shared");
  if (nvcuda::wmma::is_lane0()) count_frag_store(true);
  nvcuda::wmma::store_matrix_sync(p, f, ldm, nvcuda::wmma::mem_row_major);
}
}  // namespace cudasim

// ---- warp collectives: ldmatrix and mma.sync (rnn_common.cuh, the TF32 mma path) -------------
// Unlike WMMA's fragments above, these hold what a GPU's lanes hold, in the PTX ISA's layouts,
// so the kernels' lane arithmetic is what is tested. Each is a warp_exchange (runtime.cpp):
// every lane of the warp must reach it, and a lane reads shared memory itself, at its arrival
// (ThreadSanitizer and AddressSanitizer see that lane's read).
namespace cudasim {
void warp_exchange(const char* op, const void* in, size_t bytes, void* all);
void count_mma_sync();  // lane 0 of each mma.sync (mma_sync_count: which path a launch took)
long long mma_sync_count();
// Lane 0 of each ldmatrix: its matrices and the shared-memory wavefronts they take (below).
void count_ldmatrix(int matrices, int wavefronts);
long long ldmatrix_count(bool wavefronts);  // matrices, or wavefronts, of every launch so far

// The wavefronts one ldmatrix matrix takes: its 8 rows of 16 bytes are read in one pass unless
// two distinct rows fall in the same 16-byte bank group (4 of the 32 four-byte banks, offset /
// 16 % 8); rows at the same address are one read (broadcast). So the pass count is the largest
// number of distinct rows in one bank group: 1 conflict-free, up to 8. Offsets are from the
// block's shared memory, which starts on a 128-byte boundary (as the kernels declare it).
inline int ldmatrix_wavefronts(const uint32_t (&offset)[8]) {
  int most = 1;
  for (int a = 0; a < 8; ++a) {
    int same_group = 0;
    for (int b = 0; b < 8; ++b) {
      bool seen = false;  // a row already counted at the same address
      for (int c = 0; c < b; ++c) seen = seen || offset[c] == offset[b];
      same_group += !seen && offset[b] / 16 % 8 == offset[a] / 16 % 8;
    }
    most = same_group > most ? same_group : most;
  }
  return most;
}

// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16: lane l < 8N supplies the address of row l % 8 of
// matrix l / 8 (16 bytes, 16-byte aligned, in this block's shared memory); register j of lane
// 4g + t receives 32-bit word t of row g of matrix j. An 8 x 8 b16 matrix is also an 8 x 4
// matrix of 32-bit words: the form the TF32 operands take.
template <int N>
void ldmatrix(unsigned (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix takes 1, 2 or 4 matrices");
  const unsigned lane = threadIdx.x % 32;
  struct Lane {
    uint32_t row[4];  // the 16 bytes this lane addresses
    uint32_t offset;  // their offset in the block's shared memory
  };
  Lane mine{};
  if (lane < 8u * N) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
      fail("ldmatrix: lane %u's row address %p is not 16-byte aligned", lane, row);
    require_shared(row, 16, "ldmatrix");
    std::memcpy(mine.row, row, 16);
    mine.offset = static_cast<uint32_t>(static_cast<const unsigned char*>(row) - dynamic_smem());
  }
  Lane all[32];
  warp_exchange(N == 1 ? "ldmatrix.x1" : N == 2 ? "ldmatrix.x2" : "ldmatrix.x4", &mine,
                sizeof mine, all);
  for (int j = 0; j < N; ++j) r[j] = all[8 * j + lane / 4].row[lane % 4];
  if (lane == 0) {
    int wavefronts = 0;
    for (int j = 0; j < N; ++j) {
      uint32_t offset[8];
      for (int i = 0; i < 8; ++i) offset[i] = all[8 * j + i].offset;
      wavefronts += ldmatrix_wavefronts(offset);
    }
    count_ldmatrix(N, wavefronts);
  }
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {d}, {a}, {b}, {c}: D = A B + C for A
// 16 x 8 (m, k), B 8 x 8 (k, n), C and D 16 x 8 fp32. Lane 4g + t holds a0 = A(g, t),
// a1 = A(g + 8, t), a2 = A(g, t + 4), a3 = A(g + 8, t + 4); b0 = B(t, g), b1 = B(t + 4, g);
// c0, c1 = C(g, 2t), C(g, 2t + 1) and c2, c3 = C(g + 8, 2t), C(g + 8, 2t + 1) (D likewise).
// The operands are read as the tensor cores read fp32 bits (truncate_tf32) and each output sums
// C and the exact products in k order in fp32: the arithmetic of the WMMA m16n16k8 model above,
// so a tile computed either way has the same bits here.
inline void mma_m16n8k8_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                             const float (&c)[4]) {
  struct Lane {
    uint32_t a[4], b[2];
  };
  const Lane mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  Lane all[32];
  warp_exchange("mma.sync.m16n8k8.tf32", &mine, sizeof mine, all);
  const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  if (lane == 0) count_mma_sync();
  const auto f = [](uint32_t bits) { return nvcuda::wmma::truncate_tf32(__uint_as_float(bits)); };
  float A[16][8], B[8][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned gl = l / 4, tl = l % 4;
    A[gl][tl] = f(all[l].a[0]);
    A[gl + 8][tl] = f(all[l].a[1]);
    A[gl][tl + 4] = f(all[l].a[2]);
    A[gl + 8][tl + 4] = f(all[l].a[3]);
    B[tl][gl] = f(all[l].b[0]);
    B[tl + 4][gl] = f(all[l].b[1]);
  }
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned m = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 8; ++k) acc += A[m][k] * B[k][n];  // exact products
    out[i] = acc;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
}  // namespace cudasim
