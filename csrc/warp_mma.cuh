// TF32 tensor-core MMA below WMMA: ldmatrix and mma.sync.m16n8k8, in the PTX ISA's register
// layouts (the "Matrix fragments for mma.m16n8k8" and "ldmatrix" sections). CUDA headers only.
//
// Why (benchmarks/NOTES.md, thirty-second session): a 16 x 16 TF32 tile's k-step through WMMA
// m16n16k8 is 4 HMMA.1684 and 8 LDS (sm_90 SASS), through two mma.sync.m16n8k8 2 HMMA.1688
// and 2 LDSM: half the MMA chain and a quarter of the loads.
//
// Lane l = 4g + t of the warp (g = l / 4, t = l % 4) holds, for D = A B + C with A 16 x 8
// (row m, column k), B 8 x 8 (k, n) and C, D 16 x 8:
//   a[0] = A(g, t), a[1] = A(g + 8, t), a[2] = A(g, t + 4), a[3] = A(g + 8, t + 4);
//   b[0] = B(t, g), b[1] = B(t + 4, g);
//   c[0], c[1] = C(g, 2t), C(g, 2t + 1); c[2], c[3] = C(g + 8, 2t), C(g + 8, 2t + 1).
// ldmatrix (.b16, no .trans) hands lane 4g + t the 32-bit word t of row g of each 8-row matrix
// of 16-byte rows, i.e. of an 8 x 4 block of fp32. So where A is stored with its rows' k
// values contiguous, one ldmatrix.x4 of the 8 x 4 blocks (rows 0-7, k 0-3), (rows 8-15, k 0-3),
// (rows 0-7, k 4-7), (rows 8-15, k 4-7) is a[0..3]; and where B^T is stored row-major (row n
// holds B(0..7, n), as X is), one ldmatrix.x2 of (n 0-7, k 0-3), (n 0-7, k 4-7) is b[0..1].
//
// Under cudasim (tests/cuda/sim) both are warp collectives with these layouts, so the kernels'
// lane arithmetic runs on the CPU; tests/cuda/warp_mma_check.cu checks the layouts against a
// plain matmul, on cudasim and on a GPU.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

namespace fused_rnn {
namespace detail {

// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16: lane l < 8N passes the address of row l % 8 of
// matrix l / 8 (16 bytes, 16-byte aligned, in shared memory); r[j] is this lane's word of
// matrix j. Every lane of the warp must execute it (.sync.aligned).
template <int N>
__device__ __forceinline__ void ldmatrix(unsigned (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix takes 1, 2 or 4 matrices");
#ifndef __CUDA_SIM__
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                 : "=r"(r[0]) : "r"(a) : "memory");
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
#else
  ::cudasim::ldmatrix<N>(r, row);
#endif
}

// An fp32 value rounded to TF32 (cvt.rna.tf32.f32, as wmma::__float_to_tf32), as the bits an
// mma.sync operand register holds.
__device__ __forceinline__ unsigned tf32_bits(float v) {
  return __float_as_uint(nvcuda::wmma::__float_to_tf32(v));
}

// d += A B (mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, layouts above). The operand
// registers hold fp32 bit patterns; the tensor cores read their TF32 part.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[2]) {
#ifndef __CUDA_SIM__
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  const float c[4] = {d[0], d[1], d[2], d[3]};
  ::cudasim::mma_m16n8k8_tf32(d, a, b, c);
#endif
}

}  // namespace detail
}  // namespace fused_rnn
