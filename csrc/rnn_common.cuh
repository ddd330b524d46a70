// Device code shared by the forward and backward persistent kernels: storage-type conversions,
// activations, W-slice loading, and the per-step "W_slice x X^T" matmul on one batch chunk.
// CUDA headers only.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "fused_rnn.h"
#include "warp_mma.cuh"

#define FRNN_CUDA_TRY(expr)                       \
  do {                                            \
    const cudaError_t frnn_err_ = (expr);         \
    if (frnn_err_ != cudaSuccess) return frnn_err_; \
  } while (0)

namespace fused_rnn {
namespace detail {

namespace wmma = nvcuda::wmma;

// ---- storage type <-> fp32 ------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Accurate expf/tanhf (not the __expf intrinsics): results must match torch to rounding.
__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// ---- W slice -> shared memory ----------------------------------------------------------------
// The W element type in shared memory: the storage type, fp32 for both fp32 paths.
template <typename T, Math M> struct WType { using type = T; };

template <typename T, Math M>
__device__ __forceinline__ T prepare_w(T v) { return v; }
template <>
__device__ __forceinline__ float prepare_w<float, Math::kTf32>(float v) {
  // Rounded once here instead of on every fragment load in every step.
  return wmma::__float_to_tf32(v);
}

// Element (r, k) of a k-blocked TF32 W slice (plan.h; k-block stride ldw): row r of k-step
// block k / 8 holds its 8 floats at r * 8. With `swizzle` (the mma.sync path, kFragMma), rows with
// bit 2 set hold their two 16-byte halves swapped: MmaTf32Ops::load_a's ldmatrix reads 16 bytes
// of 8 consecutive rows, 32 bytes apart, and unswizzled rows r and r + 4 share a bank group (a
// 2-way conflict on every A load); swizzled, the 8 rows fill the 8 groups. WMMA's loads take one
// row stride, so they read the unswizzled layout. Rows a multiple of 8 apart swizzle alike, so
// tile origins (rows a multiple of 16) are the same either way.
__device__ __forceinline__ size_t k_blocked_index(int ldw, int r, int k, bool swizzle) {
  return (size_t)(k / 8) * ldw + r * 8 + ((k % 8) ^ (swizzle ? r & 4 : 0));
}

// Element (r, k) of the W slice in shared memory (plan.h: row-major, or k-blocked for kTf32,
// swizzled for the mma path where `swizzle`).
template <Math M>
__device__ __forceinline__ size_t w_index(const Plan& pl, int r, int k, bool swizzle = false) {
  constexpr TileShape ts = tile_shape(M);
  if constexpr (k_blocked(M)) {
    static_assert(ts.wk == 8, "k_blocked_index takes 8-wide k-steps");
    return k_blocked_index(pl.ldw, r, k, swizzle);
  } else {
    (void)swizzle;
    return (size_t)r * pl.ldw + k;
  }
}

// Zeroes the whole W region (padding rows and columns feed the MMA; the k-blocked tail is read
// by the last tiles) before the slice is written. Ends with __syncthreads().
template <typename T>
__device__ void zero_w(T* sw, const Plan& pl) {
  uint4* p = reinterpret_cast<uint4*>(sw);  // w_bytes is a multiple of 128
  for (int i = threadIdx.x; i < pl.w_bytes / 16; i += blockDim.x) p[i] = make_uint4(0, 0, 0, 0);
  __syncthreads();
}

// One element of a W slice copy: its value, and whether W has it (else it stays as zero_w left
// it, and nothing is stored).
template <typename T>
struct WElem {
  T v;
  bool ok;
};

// Copies the (rows, cols) slice of W into shared memory: load(r, c) is element (r, c) (a
// WElem), store(r, c, v) writes one W has. Thread t takes
// the flat indices t, t + blockDim.x, ... of the row-major (rows, cols) space (stepped without a
// division; consecutive threads read consecutive columns, contiguous in W), kWLoadBatch at a
// time: every load of a batch is issued before its first store, so that many global round trips
// are in flight per thread instead of one. (One at a time, as it was, the copy took 120-190 us
// a launch at S3 and S4 in run 2's phase table: a few hundred dependent loads per thread.)
constexpr int kWLoadBatch = 16;

template <typename Load, typename Store>
__device__ void copy_w_slice(int rows, int cols, Load&& load, Store&& store) {
  using V = decltype(load(0, 0));
  if (rows <= 0 || cols <= 0) return;
  const int step_r = blockDim.x / cols, step_c = blockDim.x % cols;
  int r = threadIdx.x / cols, c = threadIdx.x % cols;
  while (r < rows) {
    V v[kWLoadBatch];
    int rs[kWLoadBatch], cs[kWLoadBatch];
#pragma unroll
    for (int i = 0; i < kWLoadBatch; ++i) {
      rs[i] = r;
      cs[i] = c;
      v[i] = load(r < rows ? r : 0, c);  // a row past the end reads row 0 and stores nothing
      r += step_r;
      c += step_c;
      if (c >= cols) {
        c -= cols;
        ++r;
      }
    }
#pragma unroll
    for (int i = 0; i < kWLoadBatch; ++i)
      if (rs[i] < rows && v[i].ok) store(rs[i], cs[i], v[i].v);
  }
}

// Forward slice: local row r = g*team_units + jt <-> W_hh row g*H + team_u0 + jt (gate-major),
// columns [k0, k0 + k_part) of K = H (plan.h: K parts; without them team_units = units,
// team_u0 = u0, k0 = 0). Rows of units past H, padding rows and columns past H stay zero
// (they feed the MMA).
template <typename T, Math M>
__device__ void load_w_forward(T* sw, const Plan& pl, const T* __restrict__ w, int hidden,
                               int g_count, int team_u0, int k0, bool swizzle) {
  zero_w(sw, pl);
  const int tu = team_units(pl);
  int row = -1, g = 0, j = 0;  // (g, j) of local row `row`: rows change every k_part elements
  copy_w_slice(
      pl.m_rows, pl.k_part,
      [&](int r, int kk) {
        if (r != row) {
          row = r;
          g = r / tu;
          j = r % tu;
        }
        const bool ok = g < g_count && team_u0 + j < hidden && k0 + kk < hidden;
        return WElem<T>{
            ok ? prepare_w<T, M>(w[(size_t)(g * hidden + team_u0 + j) * hidden + k0 + kk])
               : from_float<T>(0.f),
            ok};
      },
      [&](int r, int kk, T v) { sw[w_index<M>(pl, r, kk, swizzle)] = v; });
}

// Backward slice: local row j <-> column team_u0 + j of W_hh (transposed), columns
// [k0, k0 + k_part) of K = G*H. Consecutive threads take consecutive j, so each global read is
// `m_rows` contiguous elements.
template <typename T, Math M>
__device__ void load_w_backward(T* sw, const Plan& pl, const T* __restrict__ w, int hidden,
                                int team_u0, int k0, bool swizzle) {
  zero_w(sw, pl);
  copy_w_slice(
      pl.k_part, pl.m_rows,
      [&](int kk, int j) {
        const bool ok = team_u0 + j < hidden && k0 + kk < pl.k;
        return WElem<T>{
            ok ? prepare_w<T, M>(w[(size_t)(k0 + kk) * hidden + team_u0 + j]) : from_float<T>(0.f),
            ok};
      },
      [&](int kk, int j, T v) { sw[w_index<M>(pl, j, kk, swizzle)] = v; });
}

// ---- dynamic shared memory -------------------------------------------------------------------
// This block's dynamic shared memory (the launch's smem_bytes). tests/cuda/sim runs these
// kernels unchanged on the CPU and supplies a per-block buffer instead.
#ifndef __CUDA_SIM__
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
}
#else
__device__ __forceinline__ unsigned char* dynamic_smem() { return ::cudasim::dynamic_smem(); }
#endif

// ---- L2 prefetch -----------------------------------------------------------------------------
// The epilogue's per-step inputs (x W_ih^T, saved activations, dy, ...) are written or read once
// and live in HBM; read cold they would add a DRAM round trip to every step's critical path.
// Each step asks L2 for the next step's, which then arrive during the grid sync and the matmul.
// A hint only: results do not depend on it. (cudasim checks the address is readable instead.)
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef __CUDA_SIM__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)));
#else
  ::cudasim::prefetch(p);
#endif
}

// Prefetches the elements [p, p + n) (n > 0): every 128-byte line they touch.
template <typename T>
__device__ __forceinline__ void prefetch_run(const T* p, int n) {
  const char* first = reinterpret_cast<const char*>(p);
  const char* last = reinterpret_cast<const char*>(p + n - 1);
  for (const char* q = first; q < last; q += 128) prefetch_l2(q);
  prefetch_l2(last);
}

// ---- optional phase timing ---------------------------------------------------------------------
__device__ __forceinline__ long long global_ns() {
#ifndef __CUDA_SIM__
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<long long>(t);
#else
  return ::cudasim::global_ns();
#endif
}

// Thread 0 of each block times the phases of fused_rnn.h's Phase enum when the launch has a prof
// buffer; otherwise every call is one uniform branch. Every mark ends one phase and starts the
// next, so the phases add up to the total exactly. own_begin() / own_end(slot) time a span
// inside a phase (kProfMmaOwn, kProfEpilogueOwn), outside that sum.
struct PhaseClock {
  long long* out;  // this block's kProfSlots, or nullptr
  long long acc[kPhases];
  long long start, last, start_ns;
  long long own[2], own_start;  // kProfMmaOwn, kProfEpilogueOwn
  int steps;

  __device__ explicit PhaseClock(long long* prof)
      : out(prof != nullptr && threadIdx.x == 0 ? prof + (size_t)blockIdx.x * kProfSlots
                                                : nullptr),
        acc{}, start(0), last(0), start_ns(0), own{}, own_start(0), steps(0) {
    if (out != nullptr) {
      start_ns = global_ns();
      start = last = clock64();
    }
  }
  __device__ __forceinline__ void mark(Phase phase) {
    if (out != nullptr) {
      const long long now = clock64();
      acc[phase] += now - last;
      last = now;
    }
  }
  __device__ __forceinline__ void own_begin() {
    if (out != nullptr) own_start = clock64();
  }
  __device__ __forceinline__ void own_end(int slot) {
    if (out != nullptr) own[slot - kProfMmaOwn] += clock64() - own_start;
  }
  __device__ __forceinline__ void step() { steps += out != nullptr; }
  __device__ __forceinline__ void finish() {
    if (out == nullptr) return;
#pragma unroll
    for (int i = 0; i < kPhases; ++i) out[i] = acc[i];
    out[kPhases] = last - start;
    out[kPhases + 1] = global_ns() - start_ns;
    out[kPhases + 2] = steps;
    out[kProfMmaOwn] = own[0];
    out[kProfEpilogueOwn] = own[1];
  }
};

// ---- the per-chunk matmul ---------------------------------------------------------------------
// Where the fp32 partial results of one chunk live in the scratch slots.
struct ChunkLayout {
  int nfr;     // batch tiles in this chunk
  int ksplit;  // K slices per tile
};

// out[m][n] for local W row m and chunk column n: the sum of the tile's K-slice partials, in
// slice order (fixed order: bitwise reproducible). ksplit <= kWarps (chunk_matmul), so the loop
// is unrolled to kWarps, predicated: all its loads issue together, in a fraction of the code a
// loop over ksplit compiles to (nvcc unrolled that 16 times with a remainder loop; the
// epilogue inlines this once a gate and point of a batch).
template <Math M>
__device__ __forceinline__ float gather(const float* sc, const Plan& pl, ChunkLayout L, int m,
                                        int n) {
  constexpr TileShape ts = tile_shape(M);
  const int tile = (m / ts.wm) * L.nfr + n / ts.wn;
  const float* p = sc + (size_t)tile * L.ksplit * pl.slot_floats + (m % ts.wm) * (ts.wn + kSlotPad)
                   + n % ts.wn;
  float acc = 0.f;
#pragma unroll
  for (int s = 0; s < kWarps; ++s)
    if (s < L.ksplit) acc += p[(size_t)s * pl.slot_floats];
  return acc;
}

// ---- WMMA operands in shared memory ---------------------------------------------------------------
// WMMA's load_matrix_sync / store_matrix_sync take generic pointers, and nvcc lowers them to one
// generic load or store per 32-bit register (LD.E / ST.E, each with its own 64-bit address):
// 10 of them per two HMMAs in a 16-bit k-step. The same PTX instructions exist with a .shared
// state space; given the 32-bit shared address of the same data, ptxas turns the 16-bit operand
// loads into ldmatrix (LDSM: 3 per two HMMAs) and the TF32 ones and the accumulators' loads and
// stores into LDS / STS. Same instruction, same fragment layout, only the address space is
// stated, so the fragments hold the same values and the MMAs give the same bits.
// frag_load<Sh> / frag_store<Sh>: with Sh, p must point into this block's shared memory (the W
// slice, the stage, the dsmem mirror, the scratch slots; cudasim checks every element's
// address); without it, WMMA's generic forms (any memory: the exchange buffer in global memory
// when X is not staged). FwdParams::frag_loads picks generic everywhere (the old code).
#ifndef __CUDA_SIM__
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#define FRNN_LD2(op)                                                                    \
  asm volatile(op " {%0,%1}, [%2], %3;" : "=r"(r[0]), "=r"(r[1]) : "r"(a), "r"(ldm) : "memory")
#define FRNN_LD4(op)                                                                    \
  asm volatile(op " {%0,%1,%2,%3}, [%4], %5;"                                           \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                         \
               : "r"(a), "r"(ldm)                                                       \
               : "memory")
#define FRNN_LD8(op)                                                                    \
  asm volatile(op " {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"                               \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]), "=r"(r[4]), "=r"(r[5]), \
                 "=r"(r[6]), "=r"(r[7])                                                 \
               : "r"(a), "r"(ldm)                                                       \
               : "memory")
#define FRNN_ST8(op)                                                                    \
  asm volatile(op " [%0], {%1,%2,%3,%4,%5,%6,%7,%8}, %9;" ::"r"(a), "r"(r[0]), "r"(r[1]), \
               "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]), "r"(r[6]), "r"(r[7]), "r"(ldm) \
               : "memory")
// The 32-bit registers of a fragment (WMMA's own loads write them through (int*)&frag too).
template <typename F>
__device__ __forceinline__ unsigned* frag_regs(F& f) {
  return reinterpret_cast<unsigned*>(&f.x[0]);
}
template <typename F>
__device__ __forceinline__ const unsigned* frag_regs(const F& f) {
  return reinterpret_cast<const unsigned*>(&f.x[0]);
}
// One overload of ptx_load (operands, accumulators) or ptx_store per fragment type the kernels
// use, each the PTX instruction of that type and shape with N registers.
#define FRNN_PTX_LOAD(FRAG, N, OP)                                                 \
  __device__ __forceinline__ void ptx_load(FRAG& f, unsigned a, unsigned ldm) {    \
    unsigned* r = frag_regs(f);                                                    \
    FRNN_LD##N(OP);                                                                \
  }
using FragBf16A = wmma::fragment<wmma::matrix_a, 8, 32, 16, __nv_bfloat16, wmma::row_major>;
using FragBf16B = wmma::fragment<wmma::matrix_b, 8, 32, 16, __nv_bfloat16, wmma::col_major>;
using FragF16A = wmma::fragment<wmma::matrix_a, 8, 32, 16, __half, wmma::row_major>;
using FragF16B = wmma::fragment<wmma::matrix_b, 8, 32, 16, __half, wmma::col_major>;
using FragTf32A =
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragTf32B =
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragAcc16 = wmma::fragment<wmma::accumulator, 8, 32, 16, float>;
using FragAccTf32 = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
FRNN_PTX_LOAD(FragBf16A, 2, "wmma.load.a.sync.aligned.row.m8n32k16.shared.bf16")
FRNN_PTX_LOAD(FragBf16B, 8, "wmma.load.b.sync.aligned.col.m8n32k16.shared.bf16")
FRNN_PTX_LOAD(FragF16A, 8, "wmma.load.a.sync.aligned.row.m8n32k16.shared.f16")
FRNN_PTX_LOAD(FragF16B, 8, "wmma.load.b.sync.aligned.col.m8n32k16.shared.f16")
FRNN_PTX_LOAD(FragTf32A, 4, "wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32")
FRNN_PTX_LOAD(FragTf32B, 4, "wmma.load.b.sync.aligned.col.m16n16k8.shared.tf32")
FRNN_PTX_LOAD(FragAcc16, 8, "wmma.load.c.sync.aligned.row.m8n32k16.shared.f32")
FRNN_PTX_LOAD(FragAccTf32, 8, "wmma.load.c.sync.aligned.row.m16n16k8.shared.f32")
__device__ __forceinline__ void ptx_store(unsigned a, const FragAcc16& f, unsigned ldm) {
  const unsigned* r = frag_regs(f);
  FRNN_ST8("wmma.store.d.sync.aligned.row.m8n32k16.shared.f32");
}
__device__ __forceinline__ void ptx_store(unsigned a, const FragAccTf32& f, unsigned ldm) {
  const unsigned* r = frag_regs(f);
  FRNN_ST8("wmma.store.d.sync.aligned.row.m16n16k8.shared.f32");
}
#undef FRNN_PTX_LOAD
#undef FRNN_LD2
#undef FRNN_LD4
#undef FRNN_LD8
#undef FRNN_ST8
#endif

// The .shared form of a fragment's load (an operand, or an accumulator: row-major).
template <typename F, typename P>
__device__ __forceinline__ void shared_load(F& f, const P* p, unsigned ldm) {
#ifndef __CUDA_SIM__
  ptx_load(f, smem_u32(p), ldm);
#else
  ::cudasim::load_shared(f, p, ldm);
#endif
}
// An A or B operand (row_major / col_major as the fragment says; ldm in elements).
template <bool Sh, typename F, typename P>
__device__ __forceinline__ void frag_load(F& f, const P* p, unsigned ldm) {
  if constexpr (Sh)
    shared_load(f, p, ldm);
  else
    wmma::load_matrix_sync(f, p, ldm);
}
// An accumulator, row-major (ldm in floats): load and store.
template <bool Sh, typename F>
__device__ __forceinline__ void acc_load(F& f, const float* p, unsigned ldm) {
  if constexpr (Sh)
    shared_load(f, p, ldm);
  else
    wmma::load_matrix_sync(f, p, ldm, wmma::mem_row_major);
}
template <bool Sh, typename F>
__device__ __forceinline__ void acc_store(float* p, const F& f, unsigned ldm) {
  if constexpr (Sh) {
#ifndef __CUDA_SIM__
    ptx_store(smem_u32(p), f, ldm);
#else
    ::cudasim::store_shared(p, f, ldm);
#endif
  } else {
    wmma::store_matrix_sync(p, f, ldm, wmma::mem_row_major);
  }
}
// Whether p is in this block's shared memory (decides Sh for X, once per slice).
__device__ __forceinline__ bool in_shared(const void* p) {
#ifndef __CUDA_SIM__
  return __isShared(p) != 0;
#else
  return ::cudasim::is_shared(p);
#endif
}

// ---- tensor-core tiles (WMMA) --------------------------------------------------------------------
// The fragments of one math and how a k-step's operands are loaded. load_a: the A operand of
// k-step kk of the tile whose first W row is at sw (row-major, row stride ldw; or, for kTf32,
// the tile's 16 x 8 block of k-step 0 in the k-blocked layout, k-step kk ldw floats further).
// load_b: the B operand of k-step kk for the batch tile whose first X row is at x (row stride
// ldx). X^T as a col-major K x N operand is X row-major: element (k, n) at x[n * ldx + k].
// Sh: the operands are in shared memory (frag_load).
// zero / load_c / store_c / mma: the accumulator's fill, its load from and store to a slot
// (row-major, ld kLdSlot; Sh as frag_load) and one k-step's MMA.
template <typename T, Math M> struct WmmaOps;

template <typename C>
struct WmmaAcc {
  static __device__ __forceinline__ void zero(C& c) { wmma::fill_fragment(c, 0.f); }
  template <bool Sh>
  static __device__ __forceinline__ void load_c(C& c, const float* slot, unsigned ld) {
    acc_load<Sh>(c, slot, ld);
  }
  template <bool Sh>
  static __device__ __forceinline__ void store_c(float* slot, const C& c, unsigned ld) {
    acc_store<Sh>(slot, c, ld);
  }
  template <typename A, typename B>
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
    wmma::mma_sync(c, a, b, c);
  }
};

template <typename T>
struct WmmaOps<T, Math::kWmma16>
    : WmmaAcc<wmma::fragment<wmma::accumulator, 8, 32, 16, float>> {
  using A = wmma::fragment<wmma::matrix_a, 8, 32, 16, T, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 8, 32, 16, T, wmma::col_major>;
  using C = wmma::fragment<wmma::accumulator, 8, 32, 16, float>;
  static constexpr unsigned kLdSlot = 32 + kSlotPad;
  template <bool Sh>
  static __device__ __forceinline__ void load_a(A& a, const T* sw, int ldw, int kk) {
    frag_load<Sh>(a, sw + kk * 16, ldw);
  }
  template <bool Sh>
  static __device__ __forceinline__ void load_b(B& b, const T* x, int ldx, int kk) {
    frag_load<Sh>(b, x + kk * 16, ldx);
  }
};

template <>
struct WmmaOps<float, Math::kTf32>
    : WmmaAcc<wmma::fragment<wmma::accumulator, 16, 16, 8, float>> {
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  static constexpr unsigned kLdSlot = 16 + kSlotPad;
  template <bool Sh>
  static __device__ __forceinline__ void load_a(A& a, const float* sw, int ldw, int kk) {
    frag_load<Sh>(a, sw + (size_t)kk * ldw, 8);  // already TF32-rounded (prepare_w)
  }
  template <bool Sh>
  static __device__ __forceinline__ void load_b(B& b, const float* x, int ldx, int kk) {
    frag_load<Sh>(b, x + kk * 8, ldx);
#pragma unroll
    for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
  }
};

// The same 16 x 16 TF32 tile as two mma.sync.m16n8k8 a k-step (warp_mma.cuh; FragLoads
// kFragMma): columns 0-7 and 8-15 of the tile, sharing A. Per k-step a lane loads A with one
// ldmatrix.x4 from the k-blocked W slice (a k-step's 16 x 8 block is 16 rows of 8 floats, so the
// four 8 x 4 matrices (rows 0-7 / 8-15, k 0-3 / 4-7) start at rows i and 8 + i, floats 0 and
// 4, the halves swizzled as k_blocked_index stores them), and B with one ldmatrix.x4 of X rows
// 0-7 and 8-15 (k 0-3 and 4-7): X must be in shared memory (Sh; block_state keeps kFragMma
// only where it is, so the W slice is swizzled exactly where this path runs). Its accumulator
// elements are its own four a half (C below), loaded and stored with plain accesses: no lane
// reads another's.
struct MmaTf32Ops {
  struct A {
    unsigned r[4];
  };
  struct B {
    unsigned r[4];  // b0, b1 of columns 0-7, then of columns 8-15
  };
  struct C {
    float d[2][4];  // columns 0-7, 8-15; (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
  };
  static constexpr unsigned kLdSlot = WmmaOps<float, Math::kTf32>::kLdSlot;
  template <bool Sh>
  static __device__ __forceinline__ void load_a(A& a, const float* sw, int ldw, int kk) {
    // Row i + (j & 1) * 8, k half j >> 1, in the swizzled layout (k_blocked_index): the half
    // flips where bit 2 of the row (of i) is set.
    const int lane = threadIdx.x & 31, j = lane >> 3, i = lane & 7;
    ldmatrix<4>(a.r, sw + (size_t)kk * ldw + (i + (j & 1) * 8) * 8 + ((j >> 1) ^ (i >> 2)) * 4);
  }
  template <bool Sh>
  static __device__ __forceinline__ void load_b(B& b, const float* x, int ldx, int kk) {
    static_assert(Sh, "the mma path reads X from shared memory");
    const int lane = threadIdx.x & 31, j = lane >> 3, i = lane & 7;
    ldmatrix<4>(b.r, x + (size_t)(i + (j >> 1) * 8) * ldx + kk * 8 + (j & 1) * 4);
#pragma unroll
    for (int q = 0; q < 4; ++q) b.r[q] = tf32_bits(__uint_as_float(b.r[q]));
  }
  static __device__ __forceinline__ void zero(C& c) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < 4; ++q) c.d[h][q] = 0.f;
  }
  // Element q of half h of this lane: row g + (q >> 1) * 8, column h * 8 + 2t + (q & 1).
  static __device__ __forceinline__ size_t at(unsigned ld, int h, int q) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    return (size_t)(g + (q >> 1) * 8) * ld + h * 8 + 2 * t + (q & 1);
  }
  template <bool Sh>
  static __device__ __forceinline__ void load_c(C& c, const float* slot, unsigned ld) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < 4; q += 2) {
        const float2 v = *reinterpret_cast<const float2*>(slot + at(ld, h, q));
        c.d[h][q] = v.x;
        c.d[h][q + 1] = v.y;
      }
  }
  template <bool Sh>
  static __device__ __forceinline__ void store_c(float* slot, const C& c, unsigned ld) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < 4; q += 2)
        *reinterpret_cast<float2*>(slot + at(ld, h, q)) = make_float2(c.d[h][q], c.d[h][q + 1]);
  }
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
    const unsigned b0[2] = {b.r[0], b.r[1]}, b1[2] = {b.r[2], b.r[3]};
    mma_tf32(c.d[0], a.r, b0);
    mma_tf32(c.d[1], a.r, b1);
  }
};

// The operations of math M for tile_mma / block_mma: WMMA, or for TF32 with Mma the mma.sync
// path.
template <typename T, Math M, bool Mma>
using TileOps = std::conditional_t<Mma, MmaTf32Ops, WmmaOps<T, M>>;

// One tile over k-steps [kb, ke): W rows at sw times X rows at x, into slot (row-major,
// ld kLdSlot; added to what it holds when `accumulate`). One dependent MMA chain.
template <typename T, Math M, bool Sh, bool Mma>
__device__ __forceinline__ void tile_mma(const T* sw, int ldw, const T* x, int ldx, int kb,
                                         int ke, float* slot, bool accumulate) {
  using Ops = TileOps<T, M, Mma>;
  typename Ops::A a;
  typename Ops::B b;
  typename Ops::C acc;
  if (accumulate)
    Ops::template load_c<Sh>(acc, slot, Ops::kLdSlot);
  else
    Ops::zero(acc);
  for (int kk = kb; kk < ke; ++kk) {
    Ops::template load_a<Sh>(a, sw, ldw, kk);
    Ops::template load_b<Sh>(b, x, ldx, kk);
    Ops::mma(acc, a, b);
  }
  Ops::template store_c<Sh>(slot, acc, Ops::kLdSlot);
}

// A block of BM x BN adjacent tiles over k-steps [kb, ke) (plan.h tile_block): tile (i, j)
// multiplies the W rows at sw + i * a_step by the X rows at x + j * b_step, and its sum goes to
// slot + i * slot_i + j * slot_j (row-major, ld kLdSlot), added to what the slot holds when
// `accumulate`. Per k-step the warp loads BM A and BN B fragments and issues BM * BN independent
// MMAs; the next k-step's fragments are loaded before this one's MMAs, so their shared-memory
// latency overlaps the tensor cores' work. Each tile's products are summed in k order, as a
// single tile's are: the results do not depend on BM and BN.
template <typename T, Math M, int BM, int BN, bool Sh, bool Mma>
__device__ __forceinline__ void block_mma(const T* sw, int ldw, size_t a_step, const T* x,
                                          int ldx, size_t b_step, int kb, int ke, float* slot,
                                          size_t slot_i, size_t slot_j, bool accumulate) {
  using Ops = TileOps<T, M, Mma>;
  typename Ops::C acc[BM][BN];
#pragma unroll
  for (int i = 0; i < BM; ++i)
#pragma unroll
    for (int j = 0; j < BN; ++j) {
      if (accumulate)
        Ops::template load_c<Sh>(acc[i][j], slot + i * slot_i + j * slot_j, Ops::kLdSlot);
      else
        Ops::zero(acc[i][j]);
    }
  typename Ops::A a0[BM], a1[BM];
  typename Ops::B b0[BN], b1[BN];
  const auto load = [&](typename Ops::A (&a)[BM], typename Ops::B (&b)[BN], int kk) {
#pragma unroll
    for (int i = 0; i < BM; ++i) Ops::template load_a<Sh>(a[i], sw + i * a_step, ldw, kk);
#pragma unroll
    for (int j = 0; j < BN; ++j) Ops::template load_b<Sh>(b[j], x + j * b_step, ldx, kk);
  };
  const auto mma = [&](const typename Ops::A (&a)[BM], const typename Ops::B (&b)[BN]) {
#pragma unroll
    for (int i = 0; i < BM; ++i)
#pragma unroll
      for (int j = 0; j < BN; ++j) Ops::mma(acc[i][j], a[i], b[j]);
  };
  if constexpr (Mma) {
    // One register set, the loop unrolled twice (ptxas issues the next k-step's ldmatrix
    // between this one's MMAs where registers allow): with the two sets below, LSTM and GRU's
    // TF32 kernels spilled 24-136 bytes (ptxas -v, sm_80 and sm_90).
#pragma unroll 2
    for (int kk = kb; kk < ke; ++kk) {
      load(a0, b0, kk);
      mma(a0, b0);
    }
  } else {
    // Two register sets, alternating: k-step kk + 1 loads while kk multiplies.
    int kk = kb;
    if (kk < ke) load(a0, b0, kk);
    for (; kk + 1 < ke; kk += 2) {
      load(a1, b1, kk + 1);
      mma(a0, b0);
      if (kk + 2 < ke) load(a0, b0, kk + 2);
      mma(a1, b1);
    }
    if (kk < ke) mma(a0, b0);
  }
#pragma unroll
  for (int i = 0; i < BM; ++i)
#pragma unroll
    for (int j = 0; j < BN; ++j)
      Ops::template store_c<Sh>(slot + i * slot_i + j * slot_j, acc[i][j], Ops::kLdSlot);
}

// One (tile, K-slice) task of the FMA path. sw: W slice (shared); x: exchange-buffer rows of
// this tile (global memory, the stage or the dsmem mirror; row stride ldx); steps [kb, ke) in
// units of wk; result -> slot (row-major, ld wn + kSlotPad).
template <typename T, Math M> struct TileMma;

// Plain fp32, an 8 x 32 tile per warp: lane l computes W row r = l % 8 of the tile against the
// batch columns q, q + 4, ..., q + 28 (q = l / 8), 8 independent accumulators per thread. Every
// lane has work even when the slice has only 8 rows (the backward slice at large H), and each
// load instruction touches 8 W rows or 4 consecutive X rows: distinct banks (ldw and the X
// strides are 4 or 20 mod 32 floats), so 16-byte loads without conflicts.
template <>
struct TileMma<float, Math::kFma> {
  static __device__ __forceinline__ void run(const float* sw, int ldw, int rows_left,
                                             const float* x, int ldx, int kb, int ke,
                                             float* slot, bool accumulate) {
    const int lane = threadIdx.x & 31;
    const int r = lane & 7, q = lane >> 3;
    float* out = slot + r * (32 + kSlotPad) + q;  // column q + 4c at out[4c]
    float acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = accumulate ? out[4 * c] : 0.f;
    if (r < rows_left) {  // rows past the slice are not in shared memory: never read
      const float* wr = sw + (size_t)r * ldw;
      const float* xq = x + (size_t)q * ldx;
#pragma unroll 2  // the next k-step's 9 loads overlap this one's 32 FMAs; no spills (ptxas -v)
      for (int kk = kb; kk < ke; ++kk) {
        const int k = kk * 4;
        const float4 w = *reinterpret_cast<const float4*>(wr + k);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float4 h = *reinterpret_cast<const float4*>(xq + (size_t)(4 * c) * ldx + k);
          acc[c] = fmaf(w.w, h.w, fmaf(w.z, h.z, fmaf(w.y, h.y, fmaf(w.x, h.x, acc[c]))));
        }
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) out[4 * c] = acc[c];
  }
};

// ---- asynchronous copies (cp.async, sm_80+) ---------------------------------------------------
// 16 bytes from global memory to shared memory without passing through registers; complete (and
// visible to this thread) after cp_async_wait_all(), to the block after a __syncthreads() that
// follows it. .cg: cached in L2 only (the exchange buffer is rewritten by other SMs every step).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifndef __CUDA_SIM__
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  ::cudasim::cp_async(smem, gmem, 16);
#endif
}
// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifndef __CUDA_SIM__
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  ::cudasim::cp_async_commit();
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef __CUDA_SIM__
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  ::cudasim::cp_async_wait(N);
#endif
}

// All threads copy rows [0, rows) x columns [0, cols) of `src` (row stride ld_src) into `dst`
// (row stride ld_dst) in 16-byte vectors. cols * sizeof(T) and both strides (in bytes) are
// multiples of 16, the pointers 16-aligned. Followed by __syncthreads() before anyone reads dst.
// stage_issue: every copy of the thread issued at once with cp.async and committed as one group
// (the caller waits); stage_copy_registers: kBatch loads in flight per thread before any store.
template <typename T>
__device__ __forceinline__ void stage_issue(T* dst, int ld_dst, const T* src, int ld_src,
                                            int rows, int cols) {
  constexpr int kVec = 16 / sizeof(T);
  const int per_row = cols / kVec;
  const int total = rows * per_row;
  for (int i = threadIdx.x; i < total; i += kThreads)
    cp_async16(dst + (size_t)(i / per_row) * ld_dst + (i % per_row) * kVec,
               src + (size_t)(i / per_row) * ld_src + (i % per_row) * kVec);
  cp_async_commit();
}

// The register copies' loop: the thread takes 16-byte chunks threadIdx.x + i * kThreads of
// [0, total), kBatch at a time, and issues load(c) for every chunk c of a batch before the
// first finish(c, loaded): kBatch round trips in flight per thread, not one.
template <int kBatch, typename Load, typename Finish>
__device__ __forceinline__ void chunks_in_flight(int total, Load&& load, Finish&& finish) {
  for (int base = threadIdx.x; base < total; base += kThreads * kBatch) {
    uint4 v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * kThreads;
      if (i < total) v[j] = load(i);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * kThreads;
      if (i < total) finish(i, v[j]);
    }
  }
}

template <typename T>
__device__ __forceinline__ void stage_copy_registers(T* dst, int ld_dst, const T* src,
                                                     int ld_src, int rows, int cols) {
  constexpr int kVec = 16 / sizeof(T);
  const int per_row = cols / kVec;
  chunks_in_flight<8>(
      rows * per_row,
      [&](int i) {
        return *reinterpret_cast<const uint4*>(src + (size_t)(i / per_row) * ld_src +
                                               (i % per_row) * kVec);
      },
      [&](int i, const uint4& v) {
        *reinterpret_cast<uint4*>(dst + (size_t)(i / per_row) * ld_dst + (i % per_row) * kVec) =
            v;
      });
}

// ---- tagged words (kStageTagged, fused_rnn.h) -----------------------------------------------
// After NCCL's low-latency protocol: each word of the exchange buffer holds a 16-bit value in
// its low half and its step's tag in the high half, stored whole with one 32-bit store, which
// is single-copy atomic: a word whose tag is step s's holds step s's value. A reader reloads a
// word until it has the tag, so it needs no barrier to know the writer is done, and no fence
// (the value travels in the word the tag vouches for). Relaxed gpu-scope loads and stores:
// they reach L2 and read it, never a stale L1 line. On cudasim they are relaxed atomics
// (ThreadSanitizer orders nothing by them), and a reload that would find the old word sleeps
// in cudasim::wait_word until some thread's store gives it the tag.
constexpr unsigned kTagMask = 0xFFFF0000u;

// The tag of the X that step s reads (h_{s-1} forward, iteration s - 1's dgates backward):
// 1 .. 65535, never 0, so a zeroed word matches no step, and the word a buffer held before (two
// steps before) never matches either. exchange_tag(0) == kFirstTag.
__device__ __forceinline__ unsigned exchange_tag(int s) {
  return (static_cast<unsigned>(s % 65535) + 1u) << 16;
}

__device__ __forceinline__ uint4 load_words(const unsigned* p) {  // 4 words, 16-byte aligned
#ifdef __CUDA_SIM__
  return make_uint4(::cudasim::load_relaxed(p), ::cudasim::load_relaxed(p + 1),
                    ::cudasim::load_relaxed(p + 2), ::cudasim::load_relaxed(p + 3));
#else
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.b32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
#endif
}

__device__ __forceinline__ void store_word(unsigned* p, unsigned v) {
#ifdef __CUDA_SIM__
  ::cudasim::store_relaxed(p, v);
#else
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#endif
}

__device__ __forceinline__ unsigned value_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned value_bits(__nv_bfloat16 v) {
  return __bfloat16_as_ushort(v);
}

// Whether the first n of the four words (n <= 0: none) carry `tag`.
__device__ __forceinline__ bool tagged_as(const uint4& v, unsigned tag, int n) {
  return (n < 1 || (v.x & kTagMask) == tag) & (n < 2 || (v.y & kTagMask) == tag) &
         (n < 3 || (v.z & kTagMask) == tag) & (n < 4 || (v.w & kTagMask) == tag);
}

// Before a reload: nothing on a GPU (the loop spins on L2); on cudasim the thread sleeps until
// the first n words carry the tag.
__device__ __forceinline__ void tag_pause(const unsigned* p, unsigned tag, int n) {
#ifdef __CUDA_SIM__
  for (int j = 0; j < n && j < 4; ++j) ::cudasim::wait_word(p + j, kTagMask, tag);
#else
  (void)p;
  (void)tag;
  (void)n;
#endif
}

// stage_copy_registers for tagged words: rows [0, rows) x columns [0, cols) of the word buffer
// `src` (row stride ld_src words) into the 16-bit `dst`, 4 words (one 16-byte load) a chunk,
// up to 8 chunks in flight per thread. Each chunk is reloaded until its words carry `tag`, then its
// values are stored (8 bytes). Columns from `real` on (the exchange buffer's padding, k >= H
// forward, >= G*H backward) are written by no block, so they are not waited for, and stored as
// zeros, what the plain buffer holds there. cols is a multiple of 4, the pointers and
// strides 16-byte aligned (src, in bytes) and 8-byte aligned (dst).
template <typename T>
__device__ __forceinline__ void stage_copy_tagged(T* dst, int ld_dst, const unsigned* src,
                                                  int ld_src, int rows, int cols, int real,
                                                  unsigned tag) {
  static_assert(sizeof(T) == 2, "a tagged word holds a 16-bit value");
  // Chunks in flight: 8, as stage_copy_registers, but 4 in bf16 for sm_80, where the LSTM and
  // GRU backward kernels spill at 8 (ptxas -v, nvcc 13.0: 92 and 40 bytes; none at 4).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  constexpr int kBatch = std::is_same_v<T, __nv_bfloat16> ? 4 : 8;
#else
  constexpr int kBatch = 8;
#endif
  const int per_row = cols / 4;
  chunks_in_flight<kBatch>(
      rows * per_row,
      [&](int i) { return load_words(src + (size_t)(i / per_row) * ld_src + (i % per_row) * 4); },
      [&](int i, uint4 v) {
        const int c = (i % per_row) * 4;
        const unsigned* w = src + (size_t)(i / per_row) * ld_src + c;
        const int n = real - c;  // real words in this chunk (at most 4 count; <= 0: none)
        while (!tagged_as(v, tag, n)) {
          tag_pause(w, tag, n);
          v = load_words(w);
        }
        const unsigned lo[4] = {n > 0 ? v.x & 0xFFFFu : 0u, n > 1 ? v.y & 0xFFFFu : 0u,
                                n > 2 ? v.z & 0xFFFFu : 0u, n > 3 ? v.w & 0xFFFFu : 0u};
        *reinterpret_cast<uint2*>(dst + (size_t)(i / per_row) * ld_dst + c) =
            make_uint2(lo[0] | (lo[1] << 16), lo[2] | (lo[3] << 16));
      });
}

// What the stage copy needs of a tagged exchange buffer (chunk_matmul's Tagged): the tag the
// step's X carries (exchange_tag), and the buffer's real columns (H forward, G*H backward; the
// rest is padding that no block writes).
struct XTags {
  unsigned tag;
  int real;
};

// One (tile, K-slice) task: W rows of tile mf against X rows of tile nf over k-steps [kb, ke).
template <typename T, Math M, bool Sh, bool Mma>
__device__ __forceinline__ void run_task(const T* wt, const Plan& pl, int rows_left, const T* xt,
                                         int ldx, int kb, int ke, float* slot, bool accumulate) {
  if constexpr (M == Math::kFma) {
    TileMma<T, M>::run(wt, pl.ldw, rows_left, xt, ldx, kb, ke, slot, accumulate);
  } else {
    (void)rows_left;
    tile_mma<T, M, Sh, Mma>(wt, pl.ldw, xt, ldx, kb, ke, slot, accumulate);
  }
}

// The blocked tasks of one stage slice (ksplit = 1, plan.h tile_block): warps take blocks of
// BM x BN tiles round-robin; tile (mf, nf) still writes slot mf * nfr + nf, as unblocked.
template <typename T, Math M, int BM, int BN, bool Sh, bool Mma>
__device__ __forceinline__ void run_blocks(const T* sw, const Plan& pl, const T* xs, int ldx,
                                           int k0, int ksteps, int mfr, int nfr, float* sc,
                                           bool accumulate) {
  constexpr TileShape ts = tile_shape(M);
  const int bnr = nfr / BN;
  const int blocks = (mfr / BM) * bnr;
  const size_t a_step = w_index<M>(pl, ts.wm, 0);  // from one W-row tile to the next
  const size_t b_step = (size_t)ts.wn * ldx;      // from one batch tile to the next
  for (int blk = threadIdx.x >> 5; blk < blocks; blk += kWarps) {
    const int mf = blk / bnr * BM, nf = blk % bnr * BN;
    block_mma<T, M, BM, BN, Sh, Mma>(sw + w_index<M>(pl, mf * ts.wm, k0), pl.ldw, a_step,
                            xs + (size_t)nf * b_step, ldx, b_step, 0, ksteps,
                            sc + (size_t)(mf * nfr + nf) * pl.slot_floats,
                            (size_t)nfr * pl.slot_floats, pl.slot_floats, accumulate);
  }
}

// The tasks of one slice: blocks of tiles where tb says so, else (tile, K-split) tasks
// round-robin over the warps (chunk_matmul). Sh: X (xs) is in shared memory. Mma: the TF32
// tiles through mma.sync (MmaTf32Ops).
template <typename T, Math M, bool Sh, bool Mma>
__device__ __forceinline__ void slice_matmul(const T* sw, const Plan& pl, const T* xs, int ldx,
                                             int k0, int ksteps, int mfr, int nfr, int ksplit,
                                             TileBlock tb, float* sc, bool accumulate) {
  constexpr TileShape ts = tile_shape(M);
  if constexpr (M != Math::kFma) {
    if (tb.bm * tb.bn > 1) {
      if (tb.bm == 2 && tb.bn == 2)
        run_blocks<T, M, 2, 2, Sh, Mma>(sw, pl, xs, ldx, k0, ksteps, mfr, nfr, sc, accumulate);
      else if (tb.bm == 2)
        run_blocks<T, M, 2, 1, Sh, Mma>(sw, pl, xs, ldx, k0, ksteps, mfr, nfr, sc, accumulate);
      else
        run_blocks<T, M, 1, 2, Sh, Mma>(sw, pl, xs, ldx, k0, ksteps, mfr, nfr, sc, accumulate);
      return;
    }
  }
  const int tiles = mfr * nfr;
  for (int task = threadIdx.x >> 5; task < tiles * ksplit; task += kWarps) {
    const int tile = task / ksplit, ks = task % ksplit;
    const int mf = tile / nfr, nf = tile % nfr;
    const int kb = ks * ksteps / ksplit, ke = (ks + 1) * ksteps / ksplit;
    run_task<T, M, Sh, Mma>(sw + w_index<M>(pl, mf * ts.wm, k0), pl, pl.m_rows - mf * ts.wm,
                       xs + (size_t)nf * ts.wn * ldx, ldx, kb, ke,
                       sc + (size_t)task * pl.slot_floats, accumulate);
  }
}

// out = W_slice * X[n0 : n0 + nreal, 0 : klen]^T for one chunk, into the scratch slots. x points
// at this block's first K column (k0, plan.h K parts) of batch row row0 of the exchange buffer
// (global memory, row0 = 0, row stride pl.k_pad; or the shared-memory mirror of
// kClusterGroupsDsmem, row0 = the group's first row, row stride mirror_ld, never staged); klen
// is a multiple of kKPad. The chunk has nreal real batch rows (of at most kChunkCols; the rows
// after them, to the next multiple of kBatchPad, exist in the exchange buffer). Warps
// take (tile, K-split) tasks round-robin; a task's K range is split the same way in every stage
// slice, so its slot sums the slices (loaded back from the slot after the first). Must be
// followed by __syncthreads() before the slots are read; with staging it synchronises the block
// itself (uniformly).
// Staging copies only the nreal real rows: X row n reaches only output column n, and the
// epilogue reads no column past the batch, so the stage rows after them may hold anything (an
// earlier slice's rows, or never-written shared memory). At B = 16 that halves the copy, at
// B = 8 quarters it. For the same reason the matmul skips the batch tiles past the real rows:
// nfr = ceil(nreal / wn), not the chunk's padded columns / wn. At B = 16 in TF32 (16-column
// tiles, 32 padded rows) that halves the tiles, so each warp's share of K (ksplit) doubles and
// its chain halves.
// Pipelined staging (kStagePipelined, when stage_k is a multiple of 32) splits the stage's
// columns into two buffers of stage_k / 2: slice s + 1 is issued into the other buffer before
// slice s is waited for, so it lands while slice s is multiplied. Slice s + 1 reuses the buffer
// of slice s - 1, which every warp has finished with at the barrier that opens iteration s.
// x is deliberately not `const __restrict__`: other blocks write it during the kernel, so the
// compiler must not route these loads through the non-coherent read-only path (ld.global.nc).
// Tagged (the kernels' template flag: the tagged exchange, fused_rnn.h tagged_exchange, so
// staged and without K parts): x is the tagged word buffer at its first column, one word an
// element at the same index, and the copy polls its words for tags.tag (stage_copy_tagged).
template <typename T, Math M, bool Tagged>
__device__ ChunkLayout chunk_matmul(const T* sw, const Plan& pl, const T* x, int ld_x, int row0,
                                    XTags tags, int klen, int n0, int nreal, float* sc, T* stage,
                                    int copy, int max_tiles, int frag_loads,
                                    PhaseClock& clk) {
  constexpr TileShape ts = tile_shape(M);
  const int mfr = ceil_div(pl.m_pad, ts.wm);
  const int nfr = ceil_div(nreal, ts.wn);  // tiles of real rows only (above)
  const int tiles = mfr * nfr;
  const bool staged = Tagged || pl.stage_k > 0;
  const bool pipe =
      !Tagged && staged && copy == kStagePipelined && pl.stage_k % (2 * kKPad) == 0;
  const int slice_k = !staged ? klen : pipe ? pl.stage_k / 2 : pl.stage_k;
  const int slices = ceil_div(klen, slice_k);
  const int ksplit = tiles < kWarps ? imin(kWarps / tiles, slice_k / ts.wk) : 1;
  const TileBlock tb = tile_block(M, mfr, nfr, max_tiles);  // 1 x 1 where ksplit > 1
  const T* xc = x + (size_t)(n0 - row0) * ld_x;  // X rows of this chunk
  const auto cols_of = [&](int s) { return imin(slice_k, klen - s * slice_k); };
  if (pipe) stage_issue(stage, pl.stage_ld, xc, ld_x, nreal, cols_of(0));
  for (int s = 0; s < slices; ++s) {
    const int k0 = s * slice_k;
    const int ksteps = cols_of(s) / ts.wk;
    const T* xs = xc + k0;
    int ldx = ld_x;
    if (staged) {
      if (s > 0) __syncthreads();  // every warp is done with slice s - 1 (and its buffer)
      clk.mark(kPhaseMma);
      T* buf = stage + (pipe ? (s & 1) * slice_k : 0);
      if constexpr (Tagged) {
        (void)copy;
        stage_copy_tagged(buf, pl.stage_ld,
                          reinterpret_cast<const unsigned*>(x) + (size_t)(n0 - row0) * ld_x + k0,
                          ld_x, nreal, ksteps * ts.wk, tags.real - k0, tags.tag);
      } else if (pipe) {
        if (s + 1 < slices) {
          stage_issue(stage + ((s + 1) & 1) * slice_k, pl.stage_ld, xc + k0 + slice_k, ld_x,
                      nreal, cols_of(s + 1));
          cp_async_wait<1>();  // slice s has landed (for this thread); s + 1 may be in flight
        } else {
          cp_async_wait<0>();
        }
      } else if (copy == kStageRegisters) {
        stage_copy_registers(buf, pl.stage_ld, xs, ld_x, nreal, ksteps * ts.wk);
      } else {
        stage_issue(buf, pl.stage_ld, xs, ld_x, nreal, ksteps * ts.wk);
        cp_async_wait<0>();
      }
      __syncthreads();  // ... and for every thread
      clk.mark(kPhaseCopy);
      xs = buf;
      ldx = pl.stage_ld;
    }
    clk.own_begin();
    // X is in shared memory when staged, or in the dsmem mirror: then every operand is (Sh;
    // the FMA path loads its own, with plain loads). The generic forms (kFragGeneric) take
    // Sh = false everywhere. kFragMma takes the mma.sync path for TF32 where X is in shared
    // memory; elsewhere, and in 16 bits, it is kFragShared. (An mma.sync copy with plain loads
    // of X from global memory spilled 8 bytes in LSTM's TF32 backward for sm_80, ptxas -v.)
    bool sh = false;
    if constexpr (M != Math::kFma)
      sh = frag_loads != kFragGeneric && (staged || in_shared(xs));
    // kFragMma is left only where X is in shared memory (block_state), and the W slice is then
    // stored swizzled for MmaTf32Ops, which WMMA could not read: every slice takes the mma path.
    bool mma = false;
    if constexpr (M == Math::kTf32) mma = frag_loads == kFragMma;
    if (mma) {
      if constexpr (M == Math::kTf32)  // no mma.sync copies of the other maths' loops
        slice_matmul<T, M, true, true>(sw, pl, xs, ldx, k0, ksteps, mfr, nfr, ksplit, tb, sc,
                                       s > 0);
    } else if (sh) {
      slice_matmul<T, M, true, false>(sw, pl, xs, ldx, k0, ksteps, mfr, nfr, ksplit, tb, sc,
                                      s > 0);
    } else {
      slice_matmul<T, M, false, false>(sw, pl, xs, ldx, k0, ksteps, mfr, nfr, ksplit, tb, sc,
                                       s > 0);
    }
    clk.own_end(kProfMmaOwn);
  }
  return ChunkLayout{nfr, ksplit};
}

// ---- the barriers -----------------------------------------------------------------------------
// grid.sync() over the cooperative grid, or the barrier of this block's cluster (ClusterMode,
// plan.h): with kClusterGroups the cluster is its batch group, and everything a block reads
// from the exchange and partial buffers was written by blocks of its own group; with
// kClusterTeams it is its K-parts team, whose partial sums are all the parts' barrier orders.
// With kClusterGroupsDsmem the cluster is the batch group too, and what it orders includes the
// peers' writes into this block's shared memory (Exchange).
// Both are release/acquire barriers (gpu and cluster scope), so reads after them see every
// write before them by the blocks they span.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_SIM__) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();  // clusters need sm_90; the binding selects them only there
#endif
}

struct StepBarrier {
  int cluster;  // ClusterMode
  // The end of a step.
  __device__ __forceinline__ void sync() const {
    if (cluster == kClusterGroups || cluster == kClusterGroupsDsmem) cluster_sync();
    else cooperative_groups::this_grid().sync();
  }
  // After a K-parts team's partial sums are written.
  __device__ __forceinline__ void parts_sync() const {
    if (cluster != kClusterNone) cluster_sync();
    else cooperative_groups::this_grid().sync();
  }
};

// ---- one block's share of the grid ----------------------------------------------------------------
// Shared memory (W slice | scratch slots | X stage) and the partition (plan.h): block b owns units
// [u0, u0 + nu) of batch group b / group_blocks, whose rows are [n_begin, n_end). With K parts
// its unit slice i = b % group_blocks is rank i % parts of team i / parts: the team's units start
// at team_u0, and this block multiplies K columns [k0, k0 + klen).
template <typename W>
struct BlockState {
  W* sw;           // the W slice
  float* sc;       // the scratch slots
  W* stage;        // the X stage slices (plan.stage_k > 0)
  int u0, nu;      // nu > 0
  int group_rows;  // rows per batch group, a multiple of kBatchPad (padding included)
  int n_begin, n_end;
  int copy;        // StageCopy (fused_rnn.h)
  int max_tiles;   // the most tiles a warp multiplies at once (FwdParams::tile_block)
  int frag_loads;     // FragLoads (fused_rnn.h): how the matmul loads its operands
  bool w_swizzle;     // the W slice is stored for the mma path (k_blocked_index)
  bool batch_points;  // run_points may load points in batches (FwdParams::point_batch == 0)
  int team, rank;  // K parts (team = slice, rank = 0 without them)
  int team_u0;     // first unit of the team
  int k0, klen;    // this block's K columns (klen > 0, a multiple of kKPad)
};

template <typename W, Math M>
__device__ __forceinline__ BlockState<W> block_state(const Plan& pl, int hidden, int batch,
                                                     int batch_pad, int copy,
                                                     int max_tiles, int point_batch,
                                                     int frag_loads, int cluster) {
  unsigned char* smem = dynamic_smem();
  BlockState<W> b;
  b.sw = reinterpret_cast<W*>(smem);
  b.sc = reinterpret_cast<float*>(smem + pl.w_bytes);
  b.stage = reinterpret_cast<W*>(smem + pl.w_bytes + (size_t)pl.slots * pl.slot_floats * 4);
  const int group = blockIdx.x / pl.group_blocks;
  const int slice = blockIdx.x % pl.group_blocks;
  b.u0 = slice * pl.units;
  b.nu = imin(pl.units, hidden - b.u0);
  b.group_rows = batch_pad / pl.groups;
  b.n_begin = group * b.group_rows;
  b.n_end = imin(b.n_begin + b.group_rows, batch);
  b.copy = copy;
  b.max_tiles = max_tiles;
  // The mma path needs X in shared memory: staged, or the dsmem mirror (a launch that fell back
  // from clusters to the plain grid has cluster = kClusterNone, and reads X from global
  // memory). Elsewhere, and in 16 bits and FMA, it is kFragShared.
  const bool x_shared = pl.stage_k > 0 || cluster == kClusterGroupsDsmem;
  b.frag_loads = frag_loads == kFragMma && !(M == Math::kTf32 && x_shared) ? kFragShared
                                                                          : frag_loads;
  b.w_swizzle = b.frag_loads == kFragMma;
  b.batch_points = point_batch == 0;
  b.team = slice / pl.parts;
  b.rank = slice % pl.parts;
  b.team_u0 = b.team * team_units(pl);
  b.k0 = b.rank * pl.k_part;
  b.klen = imin(pl.k_part, pl.k_pad - b.k0);
  return b;
}

// ---- the epilogue's points ---------------------------------------------------------------------
// A point (one batch row and unit) is a few global loads (x W_ih^T, biases, the carried state,
// ...), arithmetic on them, and stores. Run one after another, each point waited for its own
// L2 round trip (two for LSTM's forward, whose load of c the compiler issued after the gate
// math), as no load of the next point may pass this one's stores (the compiler cannot tell
// they do not alias); at S4 a thread has 8 points a step. So a thread first loads a batch of
// points (Point::load: every value a point reads, into registers), then finishes them
// (Point::finish: the arithmetic and the stores, as for one point alone): one round trip a
// batch. Same bits: each point's arithmetic is unchanged, and no point reads what another
// writes (a (b, u) belongs to one thread; the exchange buffer a step reads and the state it
// carries are written only by that thread or before the step's barrier).
// Points a batch (Point::kBatch): as many as compile without spilling (test_kernels_do_not_spill;
// nvcc 13.0, sm_80 and sm_90): 4; 2 in the FMA kernels; 1 in the fp16 kernels, at the register
// limit already (WMMA's fp16 fragments of m8n32k16 hold 16 halves a lane, where bf16's A
// fragment holds 4).
// A batch's code holds kBatch copies of the cell, so a warp takes it only while its lane 0 (which
// has the most points left) has two or more; a warp with one point a thread (S1, S5, S6) runs
// the one-point code, no larger than before batches. FwdParams::point_batch = 1 makes every warp
// run the one-point code (the bench's cuda-pb1: the same bits, the epilogue without batches).
template <typename T, Math M>
constexpr int point_batch() {
  return std::is_same_v<T, __half> ? 1 : std::is_same_v<T, float> && M == Math::kFma ? 2 : 4;
}

// Items [0, count) of the block: item idx is unit j = idx % units of batch row
// b0 + idx / units, a point where j < nu; rec(b, j, g) is gate g's matmul output there. The
// thread takes items threadIdx.x + i * kThreads: in batches while `batch` and its warp's lane 0
// has two or more left (a warp-uniform test), then one at a time.
template <typename Point, typename Rec>
__device__ __forceinline__ void run_points(const Point& pt, int count, int units, int nu, int b0,
                                           bool batch, Rec&& rec) {
  constexpr int P = Point::kBatch;
  int base = threadIdx.x;
  if constexpr (P > 1) {
    const int lead = (threadIdx.x & ~31) - threadIdx.x;  // lane 0's item is base + lead
    for (; batch && base + lead + kThreads < count; base += kThreads * P) {
#ifdef __CUDA_SIM__
      ::cudasim::count_point_batch();
#endif
      typename Point::In in[P];
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const int idx = base + q * kThreads;
        const int j = idx % units, b = b0 + idx / units;
        if (idx < count && j < nu) in[q] = pt.load(b, j, [&](int g) { return rec(b, j, g); });
      }
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const int idx = base + q * kThreads;
        const int j = idx % units, b = b0 + idx / units;
        if (idx < count && j < nu) pt.finish(b, j, in[q]);
      }
    }
  }
  for (; base < count; base += kThreads) {
    const int j = base % units, b = b0 + base / units;
    if (j < nu) pt.finish(b, j, pt.load(b, j, [&](int g) { return rec(b, j, g); }));
  }
}

// One step of this block, both directions: for each batch chunk of its group, the recurrent
// matmul against the exchange buffer x (row stride ld_x from batch row row0, and its tags where
// Tagged, as chunk_matmul takes them), then the point of every real batch row b and owned unit
// u0 + j (run_points: point.load(b, j, rec), then point.finish(b, j, loaded)), where rec(g) is
// the matmul's output
// for gate g of that (b, j) (forward: the team row g*team_units + rank*units + j; backward:
// g = 0). All threads call it (it synchronises the block).
// With K parts (part != nullptr) the matmul of all chunks comes first: each chunk's sums for
// every team row go to part[rank][b][team*m_rows + row]; then the parts' barrier (every rank's
// partials are written and visible; a team lies within one batch group), and the points read
// rec(g) as the sum of the parts' partials in rank order. The buffer is reused next step only
// after the step's closing barrier, so one copy is enough.
template <typename W, Math M, bool Tagged, typename Point>
__device__ __forceinline__ void block_step(const BlockState<W>& bs, const Plan& pl, int batch,
                                           int batch_pad, const W* x, int ld_x, int row0,
                                           XTags tags, float* part, const StepBarrier& bar,
                                           PhaseClock& clk, const Point& point) {
  const int own = bs.rank * pl.units;  // this block's first row among the team's units
  const int tu = team_units(pl);
  for (int n0 = bs.n_begin; n0 < bs.n_end; n0 += kChunkCols) {
    const int ncols = imin(kChunkCols, bs.n_begin + bs.group_rows - n0);
    const int nb = imin(ncols, batch - n0);  // real batch rows of this chunk (n0 < n_end)
    const ChunkLayout L = chunk_matmul<W, M, Tagged>(bs.sw, pl, x + bs.k0, ld_x, row0, tags,
                                                     bs.klen, n0, nb, bs.sc, bs.stage, bs.copy,
                                                     bs.max_tiles, bs.frag_loads, clk);
    __syncthreads();
    clk.mark(kPhaseMma);
    if (part == nullptr) {
      clk.own_begin();
      run_points(point, nb * pl.units, pl.units, bs.nu, n0, bs.batch_points,
                 [&](int b, int j, int g) {
        return gather<M>(bs.sc, pl, L, g * tu + own + j, b - n0);
      });
      clk.own_end(kProfEpilogueOwn);
    } else {
      float* out = part + (size_t)bs.rank * batch_pad * pl.part_ld + (size_t)bs.team * pl.m_rows;
      for (int idx = threadIdx.x; idx < nb * pl.m_rows; idx += kThreads) {
        const int m = idx % pl.m_rows, n = idx / pl.m_rows;
        out[(size_t)(n0 + n) * pl.part_ld + m] = gather<M>(bs.sc, pl, L, m, n);
      }
    }
    __syncthreads();  // the slots are reused by the next chunk (unstaged: nothing else orders it)
    clk.mark(kPhaseEpilogue);
  }
  if (part != nullptr) {
    bar.parts_sync();
    clk.mark(kPhaseParts);
    const float* in = part + (size_t)bs.team * pl.m_rows + own;
    const size_t rank_stride = (size_t)batch_pad * pl.part_ld;
    clk.own_begin();
    run_points(point, (bs.n_end - bs.n_begin) * pl.units, pl.units, bs.nu, bs.n_begin,
               bs.batch_points, [&](int b, int j, int g) {
      // All loads first (unrolled, predicated), so they are in flight together; then the sum
      // in rank order.
      const float* p = in + (size_t)b * pl.part_ld + g * tu + j;
      float v[kMaxParts];
#pragma unroll
      for (int r = 0; r < kMaxParts; ++r) v[r] = r < pl.parts ? p[r * rank_stride] : 0.f;
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxParts; ++r)
        if (r < pl.parts) acc += v[r];
      return acc;
    });
    clk.own_end(kProfEpilogueOwn);
    clk.mark(kPhaseEpilogue);
  }
  clk.step();
}

// ---- the exchange buffer: global memory, or the cluster's shared memory ----------------------------
// Where step s reads X (h_{s-1} forward, the dgates backward) and where its epilogue publishes
// X for step s + 1. Two buffers, alternating: step s reads buffer s % 2 and writes buffer
// (s + 1) % 2, so one barrier per step suffices (see rnn_forward.cu).
//   global (every mode but kClusterGroupsDsmem): the (2, B_pad, k_pad) buffer in global
//     memory/L2; element (b, k) of a buffer at b * k_pad + k;
//   dsmem (kClusterGroupsDsmem): each block holds its group's rows in two mirrors in shared
//     memory (where the stage would be; plan.h mirror_ld, mirror_bytes; element (b, k) at
//     (b - row0) * ld + k) and a step's put() stores each element into the same place in every
//     peer of the cluster (the cluster is the group), itself included: the matmul then reads X
//     from its own shared memory, with no copy from L2. init() zeroes the mirrors (and loads
//     mirror 0 from global buffer 0) and ends at the cluster's barrier, so no peer writes into a
//     mirror before it is initialised. No block may write into a peer after the last barrier
//     (the peer may have exited), so the last step's view stores locally only; the forward
//     then copies its own units to global memory (finish(), for h_n).
//   tagged (kStageTagged, fused_rnn.h tagged_exchange): the global buffer holds words (element
//     (b, k) the word at b * k_pad + k), and put() stores the value with the tag of the step
//     that reads it (exchange_tag(s + 1)). No barrier: the stage copy polls the words for
//     their tag (stage_copy_tagged), and double buffering is ordered by the data alone: it
//     needs no order between different words. The argument holds chunk by chunk (a block works
//     its 64-row batch chunks in turn, each one a poll, a matmul and an epilogue): a block Q
//     overwrites a word of buffer s % 2 in a chunk's rows (step s + 2's put) only after its
//     poll has accepted every real word of step s + 1's X in that chunk's rows, among them
//     the units of each block P of its batch group (each owns at least one, plan.h
//     make_plan). P puts those only after its own poll of that chunk of buffer s % 2 has
//     accepted step s's words: the puts follow the stage copy and a __syncthreads in
//     block_step. So
//     if a load of P's poll ever returned Q's step s + 2 word, the load that later accepted
//     step s's word would be a load of the same thread at the same address reading a word
//     that comes earlier in that address's coherence order. The PTX memory model's
//     per-location sequential consistency forbids that for strong accesses (relaxed, gpu
//     scope) in one GPU. So the poll neither takes a wrong value (the tag vouches for the
//     word it is in) nor waits for a word already overwritten; no barrier or fence orders
//     the loads before the stores.
// A step's view: what the epilogue needs, few registers (the FMA kernels run at 255).
template <typename T>
struct ExchangeStep {
  const T* in;   // buffer s % 2
  T* out;        // buffer (s + 1) % 2 (this block's copy in dsmem)
  int ld;        // row stride of both
  int row0;      // batch row of their first row
  int peers;     // dsmem: blocks to store into (ranks 0 .. peers - 1); 0: a plain store to out
  unsigned tag;  // tagged: what put() stores in the high half (in and out point at words); 0: not
  __device__ size_t at(int b, int k) const { return (size_t)(b - row0) * ld + k; }
  // Element (b, k) of the input buffer, for a point's own unit (forward: h_{t-1}), which only
  // this thread writes (or the binding, before the launch): no poll. A tagged word's value is
  // its low half, at its address (little-endian).
  __device__ __forceinline__ T get(int b, int k) const {
    if constexpr (sizeof(T) == 2) {
      if (tag != 0u)
        return *reinterpret_cast<const T*>(reinterpret_cast<const unsigned*>(in) + at(b, k));
    }
    return in[at(b, k)];
  }
  __device__ __forceinline__ void put(int b, int k, T v) const {
    if constexpr (sizeof(T) == 2) {
      if (tag != 0u) {
        store_word(reinterpret_cast<unsigned*>(out) + at(b, k), tag | value_bits(v));
        return;
      }
    }
    T* dst = out + at(b, k);
    if (peers == 0) {
      *dst = v;
    } else {
#if defined(__CUDA_SIM__) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
      const auto cluster = cooperative_groups::this_cluster();
      for (int r = 0; r < peers; ++r) *cluster.map_shared_rank(dst, r) = v;
#else
      __trap();  // clusters need sm_90; the binding selects them only there
#endif
    }
  }
};

template <typename T>
struct Exchange {
  T* global;          // the (2, B_pad, k_pad) buffer (tagged: of words)
  size_t global_buf;  // B_pad * k_pad
  int k_pad;
  bool tagged;
  bool dsmem;
  T* mirror;          // this block's mirrors (dsmem)
  int ld;             // mirror row stride (dsmem)
  size_t mirror_buf;  // elements per mirror (dsmem)
  int row0;           // the group's first batch row (dsmem)
  int rows;           // the group's rows, padding included (dsmem)
  int peers;          // blocks in the cluster (dsmem)

  // Step s's view; `last`: no step reads what it writes inside the kernel.
  __device__ ExchangeStep<T> step(int s, bool last) const {
    if (tagged) {
      unsigned* words = reinterpret_cast<unsigned*>(global);
      return {reinterpret_cast<const T*>(words + (s & 1) * global_buf),
              reinterpret_cast<T*>(words + ((s + 1) & 1) * global_buf), k_pad, 0, 0,
              exchange_tag(s + 1)};
    }
    if (!dsmem)
      return {global + (s & 1) * global_buf, global + ((s + 1) & 1) * global_buf, k_pad, 0, 0,
              0u};
    return {mirror + (s & 1) * mirror_buf, mirror + ((s + 1) & 1) * mirror_buf, ld, row0,
            last ? 0 : peers, 0u};
  }
  // What step s's stage copy needs (tagged; else unused): the tag of the X it reads, and the
  // real columns (`real`: H forward, G*H backward).
  __device__ XTags tags(int s, int real) const {
    return {tagged ? exchange_tag(s) : 0u, tagged ? real : 0};
  }
  // dsmem: zero both mirrors, copy the group's rows of global buffer 0 into mirror 0 (with
  // load_global; the backward's buffer 0 is zeros), then the cluster's barrier. All threads
  // call it.
  __device__ void init(bool load_global) const {
    if (!dsmem) return;
    uint4* z = reinterpret_cast<uint4*>(mirror);  // mirror_bytes is a multiple of 128
    const size_t words = 2 * mirror_buf * sizeof(T) / 16;
    for (size_t i = threadIdx.x; i < words; i += kThreads) z[i] = make_uint4(0, 0, 0, 0);
    __syncthreads();
    if (load_global) {
      constexpr int kVec = 16 / sizeof(T);
      const int per_row = k_pad / kVec;  // k_pad * sizeof(T) is a multiple of 32 bytes
      for (int i = threadIdx.x; i < rows * per_row; i += kThreads) {
        const int r = i / per_row, c = (i % per_row) * kVec;
        *reinterpret_cast<uint4*>(mirror + (size_t)r * ld + c) =
            *reinterpret_cast<const uint4*>(global + (size_t)(row0 + r) * k_pad + c);
      }
      __syncthreads();
    }
    cluster_sync();
  }
  // dsmem, after the last step s = steps - 1: this block's units [u0, u0 + nu) of the real rows
  // [row0, n_end) go from its copy of buffer steps % 2 (written by its own threads only, at the
  // last step) to global buffer steps % 2, where the caller reads h_n.
  __device__ void finish(int steps, int n_end, int u0, int nu) const {
    if (!dsmem) return;
    __syncthreads();
    const T* src = mirror + (steps & 1) * mirror_buf;
    T* dst = global + (steps & 1) * global_buf;
    for (int i = threadIdx.x; i < (n_end - row0) * nu; i += kThreads) {
      const int b = row0 + i / nu, u = u0 + i % nu;
      dst[(size_t)b * k_pad + u] = src[(size_t)(b - row0) * ld + u];
    }
  }
};

// Tagged: the kernel's template flag (a constant, so the untagged kernels hold no tagged code).
template <typename T, Math M, bool Tagged>
__device__ __forceinline__ Exchange<T> make_exchange(void* global, const Plan& pl, int batch_pad,
                                                    int cluster, T* mirror, int row0) {
  Exchange<T> e;
  e.global = static_cast<T*>(global);
  e.global_buf = (size_t)batch_pad * pl.k_pad;
  e.k_pad = pl.k_pad;
  e.tagged = Tagged;
  e.dsmem = cluster == kClusterGroupsDsmem;
  e.mirror = mirror;
  e.ld = mirror_ld(pl, M);
  e.mirror_buf = (size_t)mirror_bytes(pl, M, batch_pad) / sizeof(T);
  e.row0 = row0;
  e.rows = batch_pad / pl.groups;
  e.peers = pl.group_blocks;
  return e;
}

// ---- launch ------------------------------------------------------------------------------------
// Lets `fn` use all the shared memory the device opts in to. The limit is set to the device's
// maximum, never to a plan's bytes: the attribute belongs to the function, process-wide, so two
// host threads launching one kernel with different plans could otherwise interleave set, set,
// launch, and the larger plan's launch would be refused. The plan's own bytes go to the
// occupancy queries and the launch (binding.cpp has checked them against the opt-in limit).
// All of a kernel's shared memory is the one dynamic array (`smem` above; a test checks that
// csrc declares no static __shared__), so the whole opt-in limit may be dynamic.
inline cudaError_t allow_optin_smem(const void* fn) {
  int device = 0, optin = 0;
  FRNN_CUDA_TRY(cudaGetDevice(&device));
  FRNN_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
}

// Cooperative launch of `kernel` with one Params argument, after checking co-residency with the
// occupancy API (a cooperative grid larger than what fits deadlocks on grid.sync otherwise; the
// runtime also refuses it, but this gives the clearer error).
template <typename Params>
cudaError_t launch_cooperative(void (*kernel)(Params), const Params& p, cudaStream_t stream) {
  int device = 0, sms = 0, coop = 0, per_sm = 0;
  FRNN_CUDA_TRY(cudaGetDevice(&device));
  FRNN_CUDA_TRY(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  if (!coop) return cudaErrorNotSupported;
  FRNN_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FRNN_CUDA_TRY(allow_optin_smem(reinterpret_cast<const void*>(kernel)));
  FRNN_CUDA_TRY(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, p.plan.smem_bytes));
  if (per_sm * sms < p.plan.blocks) return cudaErrorCooperativeLaunchTooLarge;
  void* args[] = {const_cast<Params*>(&p)};
  // The launch API returns its own errors. cudaGetLastError() here would also return (and
  // clear) an error some earlier call of someone else's left pending, as if this launch failed.
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(p.plan.blocks),
                                     dim3(kThreads), args, p.plan.smem_bytes, stream);
}

// A launch with clusters (p.cluster, plan.h ClusterMode): kClusterGroups, plan.groups
// clusters of plan.group_blocks blocks in an ordinary launch (clusters never wait for each
// other); kClusterTeams, clusters of plan.parts blocks in a cooperative launch. *launched =
// false, and nothing runs, where the device cannot hold every cluster (every block, for a
// cooperative grid) at once, or refuses the cluster shape or the launch, and where the kernels
// were compiled without sm_90 code: the caller then runs the same plan as a plain cooperative
// grid, with the same results.
template <typename Params>
cudaError_t launch_clusters(void (*kernel)(Params), const Params& p, cudaStream_t stream,
                            bool* launched) {
  *launched = false;
  const bool teams = p.cluster == kClusterTeams;  // else kClusterGroups(Dsmem): one a group
  const int size = teams ? p.plan.parts : p.plan.group_blocks;
  const int needed = p.plan.blocks / size;
  const void* fn = reinterpret_cast<const void*>(kernel);
  FRNN_CUDA_TRY(allow_optin_smem(fn));
  cudaFuncAttributes attrs{};
  FRNN_CUDA_TRY(cudaFuncGetAttributes(&attrs, fn));
  // An extension built without sm_90 code (TORCH_CUDA_ARCH_LIST="8.0+PTX", say) runs on an
  // sm_90 device as PTX compiled for sm_80, where the kernels' cluster branches are compiled
  // out and trap: the plain grid runs instead.
  if (attrs.ptxVersion < 90) return cudaSuccess;
  if (teams) {  // a cooperative grid must be co-resident (as launch_cooperative checks)
    int device = 0, sms = 0, per_sm = 0;
    FRNN_CUDA_TRY(cudaGetDevice(&device));
    FRNN_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    FRNN_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                                p.plan.smem_bytes));
    if (per_sm * sms < p.plan.blocks) return cudaSuccess;
  }
  if (size > 8 &&  // past the portable cluster size (H100: up to 16)
      cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaSuccess;
  }
  cudaLaunchAttribute attr[2] = {};
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(size);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeCooperative;
  attr[1].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.plan.blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(p.plan.smem_bytes);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;  // the cluster shape alone for the occupancy query
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, fn, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaSuccess;
  }
  if (clusters < needed) return cudaSuccess;
  cfg.numAttrs = teams ? 2 : 1;
  void* args[] = {const_cast<Params*>(&p)};
  if (cudaLaunchKernelExC(&cfg, fn, args) != cudaSuccess) {  // refused: nothing was launched
    (void)cudaGetLastError();
    return cudaSuccess;
  }
  *launched = true;
  ++cluster_launches;
  return cudaSuccess;  // the launch's own errors came back from cudaLaunchKernelExC
}

// Whether launch p of storage type T can run the tagged kernels (stage_copy kStageTagged on a
// plan fused_rnn.h tagged_exchange takes). A launcher refuses kStageTagged elsewhere, which
// the binding never asks for (it runs kStageRegisters there).
template <typename T, typename Params>
bool tagged_launch(const Params& p) {
  const Storage st = sizeof(T) == 2 ? Storage::kFloat16 : Storage::kFloat32;  // either 16-bit
  return p.stage_copy == kStageTagged && tagged_exchange(p.plan, st, p.cluster);
}

// One chunk: with the clusters p.cluster asks for where the device takes them, else as a plain
// cooperative grid.
template <typename Params>
cudaError_t launch_chunk(void (*kernel)(Params), const Params& p, cudaStream_t stream) {
  if (p.cluster != kClusterNone) {
    bool launched = false;
    FRNN_CUDA_TRY(launch_clusters(kernel, p, stream, &launched));
    if (launched) return cudaSuccess;
    Params grid = p;
    grid.cluster = kClusterNone;
    return launch_cooperative(kernel, grid, stream);
  }
  return launch_cooperative(kernel, p, stream);
}

// ---- the per-step path (fused_rnn.h StepArgs) ---------------------------------------------
constexpr int kStepThreads = 256;

// The Point template's math for a step launch: it only sets Point::kBatch, which the step
// kernels do not use (one point a thread).
template <typename T>
constexpr Math kStepMath = std::is_same_v<T, float> ? Math::kFma : Math::kWmma16;

// The exchange buffer of iteration s, (2, B, ld) with no padding rows: read s % 2, write
// (s + 1) % 2.
template <typename T>
__device__ __forceinline__ ExchangeStep<T> step_exchange(void* buf, int batch, int ld, int s) {
  T* b = static_cast<T*>(buf);
  const size_t one = (size_t)batch * ld;
  return {b + (s & 1) * one, b + ((s + 1) & 1) * one, ld, 0, 0, 0u};
}

// A step launch's point for this thread: (batch row *b, unit *u), or false past the last one.
__device__ __forceinline__ bool step_point(int batch, int hidden, int* b, int* u) {
  const long long idx = (long long)blockIdx.x * kStepThreads + threadIdx.x;
  if (idx >= (long long)batch * hidden) return false;
  *b = (int)(idx / hidden);
  *u = (int)(idx % hidden);
  return true;
}

// An ordinary launch of `kernel` with one thread a point, `points` of them.
template <typename Args>
cudaError_t launch_points(void (*kernel)(Args), const Args& a, long long points,
                          cudaStream_t stream) {
  const long long blocks = (points + kStepThreads - 1) / kStepThreads;
  if (points <= 0 || blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kStepThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = nullptr;
  cfg.numAttrs = 0;
  void* args[] = {const_cast<Args*>(&a)};
  return cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(kernel), args);
}

}  // namespace detail
// Explicit instantiations of LAUNCH (launch_forward or launch_backward) for every cell, storage
// type and math (fused_rnn.h: dispatch).
#define FRNN_INSTANTIATE_CELL(LAUNCH, PARAMS, C)                                               \
  template cudaError_t LAUNCH<C, __nv_bfloat16, Math::kWmma16>(const PARAMS&, cudaStream_t);   \
  template cudaError_t LAUNCH<C, __half, Math::kWmma16>(const PARAMS&, cudaStream_t);          \
  template cudaError_t LAUNCH<C, float, Math::kTf32>(const PARAMS&, cudaStream_t);             \
  template cudaError_t LAUNCH<C, float, Math::kFma>(const PARAMS&, cudaStream_t);
// ... and of LAUNCH (launch_forward_step or launch_backward_step) for every cell and storage type.
#define FRNN_INSTANTIATE_STEP_CELL(LAUNCH, PARAMS, C)                                       \
  template cudaError_t LAUNCH<C, __nv_bfloat16>(const PARAMS&, const float*, int, cudaStream_t); \
  template cudaError_t LAUNCH<C, __half>(const PARAMS&, const float*, int, cudaStream_t);        \
  template cudaError_t LAUNCH<C, float>(const PARAMS&, const float*, int, cudaStream_t);
#define FRNN_INSTANTIATE_STEP(LAUNCH, PARAMS)                \
  FRNN_INSTANTIATE_STEP_CELL(LAUNCH, PARAMS, Cell::kLSTM)    \
  FRNN_INSTANTIATE_STEP_CELL(LAUNCH, PARAMS, Cell::kGRU)     \
  FRNN_INSTANTIATE_STEP_CELL(LAUNCH, PARAMS, Cell::kRNNTanh) \
  FRNN_INSTANTIATE_STEP_CELL(LAUNCH, PARAMS, Cell::kRNNRelu)
#define FRNN_INSTANTIATE(LAUNCH, PARAMS)                \
  FRNN_INSTANTIATE_CELL(LAUNCH, PARAMS, Cell::kLSTM)    \
  FRNN_INSTANTIATE_CELL(LAUNCH, PARAMS, Cell::kGRU)     \
  FRNN_INSTANTIATE_CELL(LAUNCH, PARAMS, Cell::kRNNTanh) \
  FRNN_INSTANTIATE_CELL(LAUNCH, PARAMS, Cell::kRNNRelu)

}  // namespace fused_rnn
