// The TF32 mma path's register layouts (csrc/warp_mma.cuh) against a plain matmul, on a GPU and
// on cudasim: the same program, so a layout cudasim models differently from the hardware shows
// up as a failure on the first GPU that runs it (test_cuda_gpu.py), and the kernels' lane
// arithmetic is checked here on the CPU (test_cuda_sim.py).
//
//   nvcc -std=c++20 -arch=sm_80 -I csrc tests/cuda/warp_mma_check.cu -o check && ./check
// or against cudasim, with its runtime.o (test_cuda_sim.py builds it so):
//   g++ -std=c++20 -I tests/cuda/sim/include -I tests/cuda/sim -I csrc -x c++
//       tests/cuda/warp_mma_check.cu -x none runtime.o -o check && ./check
//
// Three checks, each by every warp of a 2-block, 2-warp launch on its own data:
//   ldmatrix  x1, x2 and x4 from rows at scattered addresses: lane 4g + t's register j is word
//             t of row g of matrix j;
//   mma       mma_tf32 with each lane's registers built from A, B and C by the documented layout
//             (no ldmatrix): D = A B + C;
//   tiles     the kernels' own tile loops with the mma path (rnn_common.cuh tile_mma and
//             block_mma with MmaTf32Ops): a 32-row W slice in the k-blocked layout (swizzled
//             for the mma path, rnn_common.cuh k_blocked_index) times 32 X
//             rows (padded as the stage pads them) over 3 k-steps, two, then one more
//             accumulated onto the slots.
// The inputs are small integers: every product and sum is exact in TF32 and fp32, so the results
// must equal the reference exactly on both. Prints one line per check; exit status 1 on a
// mismatch.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "rnn_common.cuh"

namespace {
using fused_rnn::Math;
namespace d = fused_rnn::detail;

#define CHECK(call)                                                                     \
  do {                                                                                  \
    const cudaError_t e_ = (call);                                                      \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                \
                   cudaGetErrorString(e_));                                             \
      std::exit(2);                                                                     \
    }                                                                                   \
  } while (0)

constexpr int kBlocks = 2, kWarpsPerBlock = 2, kSets = kBlocks * kWarpsPerBlock;
constexpr int kM = 32, kN = 32, kSteps = 3, kK = kSteps * 8;  // the tiles check
constexpr int kLdx = kK + 4;                                  // X rows, as the stage pads them
constexpr unsigned kLd = d::MmaTf32Ops::kLdSlot;              // a slot's row stride
constexpr int kSlot = 16 * kLd;                               // a slot's floats
constexpr int kWays = 2;                                      // tile_mma, block_mma

__device__ int warp_set() { return blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; }

// ldmatrix: row r of matrix j (words j * 1000 + r * 10 + w) lies at slot (8j + r) * 5 % 32 of
// the warp's 32 16-byte slots, so a lane that read its neighbour's address would see it.
__global__ void ldmatrix_kernel(unsigned* out) {
  unsigned* rows = reinterpret_cast<unsigned*>(d::dynamic_smem()) + (threadIdx.x / 32) * 128;
  const int lane = threadIdx.x % 32, set = warp_set();
  for (int i = lane; i < 128; i += 32) {
    const int slot = i / 4, w = i % 4;
    int row = 0;
    while ((row * 5) % 32 != slot) ++row;  // the row stored in this slot
    rows[i] = set * 100000 + (row / 8) * 1000 + (row % 8) * 10 + w;
  }
  __syncthreads();
  const unsigned* mine = rows + ((lane * 5) % 32) * 4;  // row lane % 8 of matrix lane / 8
  unsigned r1[1], r2[2], r4[4];
  d::ldmatrix<1>(r1, mine);
  d::ldmatrix<2>(r2, mine);
  d::ldmatrix<4>(r4, mine);
  unsigned* o = out + (set * 32 + lane) * 7;
  o[0] = r1[0];
  for (int j = 0; j < 2; ++j) o[1 + j] = r2[j];
  for (int j = 0; j < 4; ++j) o[3 + j] = r4[j];
}

// mma: A (16 x 8), B (8 x 8, (k, n)), C (16 x 8) row-major per set; D likewise.
__global__ void mma_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x % 32, set = warp_set(), g = lane / 4, t = lane % 4;
  const float* a = A + set * 128;
  const float* b = B + set * 64;
  const float* c = C + set * 128;
  const unsigned ar[4] = {d::tf32_bits(a[g * 8 + t]), d::tf32_bits(a[(g + 8) * 8 + t]),
                          d::tf32_bits(a[g * 8 + t + 4]), d::tf32_bits(a[(g + 8) * 8 + t + 4])};
  const unsigned br[2] = {d::tf32_bits(b[t * 8 + g]), d::tf32_bits(b[(t + 4) * 8 + g])};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                  c[(g + 8) * 8 + 2 * t + 1]};
  d::mma_tf32(acc, ar, br);
  float* o = D + set * 128;
  o[g * 8 + 2 * t] = acc[0];
  o[g * 8 + 2 * t + 1] = acc[1];
  o[(g + 8) * 8 + 2 * t] = acc[2];
  o[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// tiles: W (kM x kK) and X (kN x kK) row-major per set; out: per set and way (0: tile_mma on
// each of the 2 x 2 tiles, 1: block_mma of all 2 x 2 at once) the kM x kN product.
__global__ void tiles_kernel(const float* W, const float* X, float* out) {
  constexpr int kWarpFloats = kSteps * kM * 8 + kN * kLdx + 4 * kSlot;
  float* sw = reinterpret_cast<float*>(d::dynamic_smem()) + (threadIdx.x / 32) * kWarpFloats;
  float* sx = sw + kSteps * kM * 8;
  float* sc = sx + kN * kLdx;
  const int lane = threadIdx.x % 32, set = warp_set();
  const float* w = W + set * kM * kK;
  const float* x = X + set * kN * kK;
  for (int i = lane; i < kM * kK; i += 32) {  // k-blocked, swizzled as the mma path stores it
    const int r = i / kK, k = i % kK;
    sw[d::k_blocked_index(kM * 8, r, k, /*swizzle=*/true)] = w[i];
  }
  for (int i = lane; i < kN * kK; i += 32) sx[(i / kK) * kLdx + i % kK] = x[i];
  __syncthreads();  // every warp takes the same path
  const int ldw = kM * 8;
  for (int way = 0; way < kWays; ++way) {
    if (way == 0) {
      for (int mf = 0; mf < 2; ++mf)
        for (int nf = 0; nf < 2; ++nf) {
          float* slot = sc + (mf * 2 + nf) * kSlot;
          const float* sw_t = sw + mf * 16 * 8;
          const float* x_t = sx + nf * 16 * kLdx;
          d::tile_mma<float, Math::kTf32, true, true>(sw_t, ldw, x_t, kLdx, 0, 2, slot, false);
          d::tile_mma<float, Math::kTf32, true, true>(sw_t, ldw, x_t, kLdx, 2, 3, slot, true);
        }
    } else {
      d::block_mma<float, Math::kTf32, 2, 2, true, true>(sw, ldw, 16 * 8, sx, kLdx, 16 * kLdx,
                                                         0, 2, sc, 2 * kSlot, kSlot, false);
      d::block_mma<float, Math::kTf32, 2, 2, true, true>(sw, ldw, 16 * 8, sx, kLdx, 16 * kLdx,
                                                         2, 3, sc, 2 * kSlot, kSlot, true);
    }
    __syncthreads();  // every warp takes the same path
    float* o = out + (set * kWays + way) * kM * kN;
    for (int i = lane; i < kM * kN; i += 32) {
      const int m = i / kN, n = i % kN;
      o[i] = sc[((m / 16) * 2 + n / 16) * kSlot + (m % 16) * kLd + n % 16];
    }
    __syncthreads();  // every warp takes the same path
  }
}

template <typename... Exp, typename... Act>
void launch(void (*kernel)(Exp...), size_t smem, Act... args) {
  if (smem > 48 * 1024) std::abort();
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kBlocks);
  cfg.blockDim = dim3(32 * kWarpsPerBlock);
  cfg.dynamicSmemBytes = smem;
  CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK(cudaMalloc(&p, v.size() * sizeof(T)));
  CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

template <typename T>
std::vector<T> to_host(const T* p, size_t n) {
  std::vector<T> v(n);
  CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// Small integers from a fixed sequence: exact in TF32, and so is every sum here.
std::vector<float> integers(size_t n, unsigned seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1103515245u + 12345u;
    v[i] = static_cast<float>(static_cast<int>((seed >> 16) % 15) - 7);
  }
  return v;
}

int report(const char* what, long bad, long total, const char* first) {
  if (bad == 0) {
    std::printf("%-9s ok (%ld values)\n", what, total);
    return 0;
  }
  std::printf("%-9s FAIL: %ld of %ld values differ; first: %s\n", what, bad, total, first);
  return 1;
}

int check_ldmatrix() {
  unsigned* out = nullptr;
  CHECK(cudaMalloc(&out, kSets * 32 * 7 * sizeof(unsigned)));
  launch(ldmatrix_kernel, kWarpsPerBlock * 128 * sizeof(unsigned), out);
  const std::vector<unsigned> got = to_host(out, kSets * 32 * 7);
  CHECK(cudaFree(out));
  long bad = 0;
  char first[160] = "";
  for (int set = 0; set < kSets; ++set)
    for (int lane = 0; lane < 32; ++lane)
      for (int k = 0; k < 7; ++k) {
        const int j = k == 0 ? 0 : k < 3 ? k - 1 : k - 3;  // matrix j of x1, x2, x4
        const unsigned want = set * 100000 + j * 1000 + (lane / 4) * 10 + lane % 4;
        const unsigned have = got[(set * 32 + lane) * 7 + k];
        if (have != want && bad++ == 0)
          std::snprintf(first, sizeof first, "set %d lane %d %s register %d: %u, want %u", set,
                        lane, k == 0 ? "x1" : k < 3 ? "x2" : "x4", j, have, want);
      }
  return report("ldmatrix", bad, kSets * 32 * 7, first);
}

int check_mma() {
  const std::vector<float> a = integers(kSets * 128, 1), b = integers(kSets * 64, 2),
                           c = integers(kSets * 128, 3);
  float *da = to_device(a), *db = to_device(b), *dc = to_device(c), *dd = nullptr;
  CHECK(cudaMalloc(&dd, kSets * 128 * sizeof(float)));
  launch(mma_kernel, 0, static_cast<const float*>(da), static_cast<const float*>(db),
         static_cast<const float*>(dc), dd);
  const std::vector<float> got = to_host(dd, kSets * 128);
  for (float* p : {da, db, dc, dd}) CHECK(cudaFree(p));
  long bad = 0;
  char first[160] = "";
  for (int set = 0; set < kSets; ++set)
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float want = c[set * 128 + m * 8 + n];
        for (int k = 0; k < 8; ++k) want += a[set * 128 + m * 8 + k] * b[set * 64 + k * 8 + n];
        const float have = got[set * 128 + m * 8 + n];
        if (have != want && bad++ == 0)
          std::snprintf(first, sizeof first, "set %d D(%d, %d) = %g, want %g", set, m, n, have,
                        want);
      }
  return report("mma", bad, kSets * 128, first);
}

int check_tiles() {
  const std::vector<float> w = integers(kSets * kM * kK, 4), x = integers(kSets * kN * kK, 5);
  float *dw = to_device(w), *dx = to_device(x), *dout = nullptr;
  const size_t n_out = (size_t)kSets * kWays * kM * kN;
  CHECK(cudaMalloc(&dout, n_out * sizeof(float)));
  const size_t smem = kWarpsPerBlock * (kSteps * kM * 8 + kN * kLdx + 4 * kSlot) * sizeof(float);
  launch(tiles_kernel, smem, static_cast<const float*>(dw), static_cast<const float*>(dx), dout);
  const std::vector<float> got = to_host(dout, n_out);
  for (float* p : {dw, dx, dout}) CHECK(cudaFree(p));
  static const char* const kWayNames[kWays] = {"tile_mma", "block_mma 2x2"};
  long bad = 0;
  char first[160] = "";
  for (int set = 0; set < kSets; ++set)
    for (int way = 0; way < kWays; ++way)
      for (int m = 0; m < kM; ++m)
        for (int n = 0; n < kN; ++n) {
          float want = 0.f;
          for (int k = 0; k < kK; ++k)
            want += w[(set * kM + m) * kK + k] * x[(set * kN + n) * kK + k];
          const float have = got[((size_t)(set * kWays + way) * kM + m) * kN + n];
          if (have != want && bad++ == 0)
            std::snprintf(first, sizeof first, "set %d %s out(%d, %d) = %g, want %g", set,
                          kWayNames[way], m, n, have, want);
        }
  return report("tiles", bad, (long)n_out, first);
}
}  // namespace

int main() {
  const int failed = check_ldmatrix() + check_mma() + check_tiles();
  return failed == 0 ? 0 : 1;
}
