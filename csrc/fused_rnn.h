// Parameters and launchers shared by the kernels (.cu) and the one C++ binding (binding.cpp).
//
// CUDA headers only (no torch): the binding fills these structs from tensors after checking
// them; the kernels see raw pointers. Layouts are row-major and contiguous; sizes:
//   T = steps, B = batch, H = hidden, G = gates (LSTM 4: i f g o, GRU 3: r z n, RNN 1),
//   B_pad = round_up(B, kBatchPad), ld = plan.k_pad (exchange-buffer row stride).
// "storage" is the input dtype (fp32, fp16 or bf16); every accumulation, the LSTM cell state
// and every saved activation are fp32 (the precision contract of fused_rnn/ops/reference.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "plan.h"

namespace fused_rnn {

// The storage dtype of a launch (the binding maps torch's dtypes to these).
enum class Storage : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Optional per-block phase timing (FwdParams/BwdParams::prof): thread 0 of each block writes
// kProfSlots int64 at prof[blockIdx.x * kProfSlots]: the clock64() cycles spent in each Phase,
// then the total cycles (their sum), the total nanoseconds (%globaltimer, to convert cycles),
// and the number of steps. A phase runs from the previous mark to its own (rnn_common.cuh
// PhaseClock), so waiting at a barrier counts towards the phase that ends there. Then two
// spans inside phases, not added to the total: thread 0's cycles in its own warp's matmul tasks
// (kProfMmaOwn: the MMA loops, without staging or the wait for the other warps) and in its own
// epilogue points (kProfEpilogueOwn: their loads and cells, without the wait for the other
// threads). A phase much longer than its own span is waiting, not working.
enum Phase : int {
  kPhaseLoad = 0,      // W slice into shared memory
  kPhaseCopy = 1,      // X stage copies (0 when unstaged)
  kPhaseMma = 2,       // the recurrent matmul, up to the slowest warp
  kPhaseEpilogue = 3,  // the cell math and stores, up to the slowest thread
  kPhaseSync = 4,      // L2 prefetch issue + the step barrier (grid.sync, or the cluster's in
                       //   cluster mode): the wait for the slowest block
  kPhaseParts = 5,     // K parts: the barrier after the partial sums (0 without parts)
  kPhases = 6,
};
constexpr int kProfMmaOwn = kPhases + 3;
constexpr int kProfEpilogueOwn = kPhases + 4;
constexpr int kProfSlots = kPhases + 5;

// How X is copied into the stage (plan.h staging; rnn_common.cuh chunk_matmul).
enum StageCopy : int {
  kStageRegisters = 0,  // loads into registers, then stores (8 x 16 B in flight per thread)
  kStageAsync = 1,      // cp.async, all of a slice in flight at once, then the matmul
  kStagePipelined = 2,  // cp.async into two half-width buffers: slice s+1 lands during s's matmul
  kStageTagged = 3,     // 16-bit X as tagged words, polled: no step barrier (tagged_exchange)
};

// The tagged exchange (kStageTagged; rnn_common.cuh Exchange): the exchange buffer holds 32-bit
// words, a 16-bit value in the low half and the tag of the step it belongs to in the high half,
// each stored whole. The stage copy reloads a word until its tag is the step's, so a block
// knows X is complete without a barrier, and the step barrier goes. kFirstTag is step 0's: the
// binding writes h0 (forward) and the zero dgates of iteration 0 (backward) under it into
// buffer 0 and zeroes buffer 1, whose tag 0 no step has.
constexpr unsigned kFirstTag = 1u << 16;

// Whether a launch of `plan` can take kStageTagged: 16-bit storage (a value and its tag fill a
// word), X staged (plan.stage_k > 0: the copy is what polls), no K parts (their partial sums
// are reused every step, after the step barrier) and no DSMEM mirror (an exchange of its own).
// The binding runs kStageRegisters elsewhere, which copies the same slices: the same bits.
inline bool tagged_exchange(const Plan& plan, Storage st, int cluster) {
  return st != Storage::kFloat32 && plan.stage_k > 0 && plan.parts == 1 &&
         cluster != kClusterGroupsDsmem && cluster != kClusterTeams;
}

// How the WMMA kernels load their operands and accumulators (rnn_common.cuh frag_load).
enum FragLoads : int {
  kFragShared = 0,   // the .shared forms wherever the data is in shared memory (ldmatrix, LDS)
  kFragGeneric = 1,  // WMMA's generic forms everywhere (one generic load per register)
  kFragMma = 2,      // TF32 with X in shared memory: mma.sync.m16n8k8 and ldmatrix
                     //   (warp_mma.cuh) instead of WMMA m16n16k8; otherwise as kFragShared
};

struct FwdParams {
  Plan plan;                // plan.h choose_launch(..., /*backward=*/false, ...)
  int steps, batch, hidden, batch_pad;
  bool reverse;             // process t = T-1 .. 0
  bool save;                // write what backward needs (activations, aux)
  const void* w_hh;         // (G*H, H) storage
  const float* b_hh;        // (G*H,) fp32 or nullptr
  const float* b_ih;        // (G*H,) fp32, added to xproj in the epilogue, or nullptr (xproj
                            //   holds it already)
  const int* lengths;       // (B,) int32 or nullptr; rows with t >= lengths[b] keep state, y = 0
  float* xproj;             // (T, B, G*H) fp32: x W_ih^T (+ b_ih unless b_ih is given) in;
                            //   activations out when save
                            //   (LSTM i f g o, GRU r z n, RNN h before rounding)
  void* hbuf;               // (2, B_pad, ld) storage, zero-padded; [0] holds h0 on entry;
                            //   h_T ends in [T % 2]
  float* cbuf;              // (B, H) fp32: c0 in, c_T out (LSTM), else nullptr
  void* y;                  // (T, B, H) storage out
  float* aux;               // when save: LSTM c_t after step t (the carried value on masked
                            //   steps), GRU W_hn h_{t-1} + b_hn; (T, B, H) fp32; else nullptr
  long long* prof;          // (>= blocks, kProfSlots) int64 phase timings, or nullptr (off)
  int stage_copy;           // StageCopy: how X is copied into the stage (kStageTagged: hbuf
                            //   holds tagged words, kFirstTag on h0; tagged_exchange)
  int tile_block;           // 1, 2 or 4: the most output tiles a warp multiplies at once
                            //   (plan.h tile_block; the results do not depend on it)
  int point_batch;          // 0: the epilogue loads points in batches (rnn_common.cuh
                            //   run_points); 1: one at a time (the results do not depend on it)
  int frag_loads;           // FragLoads: how the tensor-core operands are loaded (the results
                            //   do not depend on it, on cudasim; kFragMma sums a TF32 tile's
                            //   k-step in one MMA instead of two on a GPU)
  float* part;              // plan.parts > 1: (parts, B_pad, plan.part_ld) fp32 scratch (the
                            //   K parts' partial sums, plan.h); else nullptr
  int cluster;              // ClusterMode: kClusterNone (one cooperative grid, every barrier a
                            //   grid.sync()), kClusterGroups, kClusterGroupsDsmem (hbuf then
                            //   holds only h0 and h_T; rnn_common.cuh Exchange) or
                            //   kClusterTeams (sm_90+)
};

struct BwdParams {
  Plan plan;                // plan.h choose_launch(..., /*backward=*/true, ...)
  int steps, batch, hidden, batch_pad;
  bool reverse;             // direction of the forward pass being differentiated
  const void* w_hh;         // (G*H, H) storage
  const int* lengths;       // (B,) int32 or nullptr
  const void* dy;           // (T, B, H) storage: gradient of y
  const float* gates;       // (T, B, G*H) fp32: FwdParams::xproj after a forward with save
  const float* aux;         // (T, B, H) fp32: FwdParams::aux (LSTM, GRU), else nullptr
  const float* c0;          // (B, H) fp32 (LSTM) else nullptr
  const void* hprev;        // (T, B, H) storage: the h each step read (GRU), else nullptr
  void* dgbuf;              // (2, B_pad, ld) storage, zeros on entry: recurrent dgates exchange
                            //   (kStageTagged: words, buffer 0's tagged kFirstTag)
  float* dh_carry;          // (B, H) fp32: dh_T in; scratch (gradient reaching h_{t-1} directly)
  float* dc_carry;          // (B, H) fp32: dc_T in, dc0 out (LSTM), else nullptr
  void* dgx;                // (T, B, G*H) storage out: gradient of the input-side pre-activations
  void* dghn;               // (T, B, H) storage out (GRU): gradient of W_hn h + b_hn, else nullptr
  float* dh0;               // (B, H) fp32 out
  long long* prof;          // (>= blocks, kProfSlots) int64 phase timings, or nullptr (off)
  int stage_copy;           // StageCopy: how X is copied into the stage
  int tile_block;           // as FwdParams::tile_block
  int point_batch;          // as FwdParams::point_batch
  int frag_loads;           // as FwdParams::frag_loads
  float* part;              // as FwdParams::part
  int cluster;              // as FwdParams::cluster
};

// Launch the whole chunk on `stream`: one cooperative grid, or with p.cluster the clusters it
// names (falling back to the plain cooperative grid, same plan and same results, where the
// device cannot hold them all at once or refuses the launch). Returns the first CUDA error
// (cudaErrorCooperativeLaunchTooLarge when the grid cannot be co-resident). T is the storage
// type (float, __half, __nv_bfloat16); explicit instantiations live in the .cu files.
template <Cell C, typename T, Math M>
cudaError_t launch_forward(const FwdParams& p, cudaStream_t stream);

// How many launches so far ran with clusters (any ClusterMode but kClusterNone, not the cooperative
// fallback): lets tests see which one ran. Host-side, not synchronised (a diagnostic).
inline long long cluster_launches = 0;

template <Cell C, typename T, Math M>
cudaError_t launch_backward(const BwdParams& p, cudaStream_t stream);

// The per-step path (binding.cpp forward_steps/backward_steps; fused_rnn/ops/cuda/ops.py
// cuda_path): no W_hh on chip and no grid barrier. Each step's recurrent matmul is a cuBLAS GEMM
// (through torch) with an fp32 result `rec`, then one ordinary launch runs that step's points,
// one thread a (batch row, unit): the persistent kernels' own ForwardPoint/BackwardPoint, so the
// cell math, the rounding and what is saved are theirs. Stream order stands in for the barrier.
//   forward:  rec (B, G*H) = h_{s-1} W_hh^T; the exchange buffer p.hbuf is (2, B, H) (row stride
//             H, no padding rows); p.plan, the tuning fields and p.part are not used.
//   backward: rec (B, H) = the dgates of iteration s-1 times W_hh (zeros at s = 0); p.dgbuf is
//             (2, B, G*H); s runs 0 .. T as in the persistent kernel (s = T writes dh0).
template <typename Params>
struct StepArgs {
  Params p;
  const float* rec;
  int s;  // the iteration (forward: t = reverse ? T-1-s : s)
};

template <Cell C, typename T>
cudaError_t launch_forward_step(const FwdParams& p, const float* rec, int s, cudaStream_t stream);

template <Cell C, typename T>
cudaError_t launch_backward_step(const BwdParams& p, const float* rec, int s,
                                 cudaStream_t stream);

// Whether the extension holds code the current device can run: cudaFuncGetAttributes of one
// kernel, which fails (cudaErrorNoKernelImageForDevice) where the build had neither SASS for
// the device's architecture nor PTX it can compile (TORCH_CUDA_ARCH_LIST="8.0" on an H100, or
// "8.0;9.0" on a newer GPU). On success, the versions of the code it would run (e.g. 90, 90).
// The error is cleared before returning: a missing image is an answer here, not a fault.
cudaError_t kernel_image(int* binary_version, int* ptx_version);

template <auto V> struct Constant { static constexpr decltype(V) value = V; };
template <typename T> struct Tag { using type = T; };

// Calls f(Constant<cell>, Tag<storage type>, Constant<math>) for the runtime (cell, storage,
// math): one instantiation per combination, all compiled once (shapes are runtime arguments).
// 16-bit storage always runs kWmma16; fp32 runs kTf32 or kFma.
template <typename F>
cudaError_t dispatch(Cell cell, Storage st, Math math, F&& f) {
  auto by_type = [&](auto c) -> cudaError_t {
    if (st == Storage::kBFloat16)
      return f(c, Tag<__nv_bfloat16>{}, Constant<Math::kWmma16>{});
    if (st == Storage::kFloat16) return f(c, Tag<__half>{}, Constant<Math::kWmma16>{});
    if (math == Math::kTf32) return f(c, Tag<float>{}, Constant<Math::kTf32>{});
    return f(c, Tag<float>{}, Constant<Math::kFma>{});
  };
  switch (cell) {
    case Cell::kLSTM: return by_type(Constant<Cell::kLSTM>{});
    case Cell::kGRU: return by_type(Constant<Cell::kGRU>{});
    case Cell::kRNNTanh: return by_type(Constant<Cell::kRNNTanh>{});
    case Cell::kRNNRelu: return by_type(Constant<Cell::kRNNRelu>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(Constant<cell>, Tag<storage type>) for the runtime (cell, storage): the step launches,
// whose points do not depend on the matmul's math.
template <typename F>
cudaError_t dispatch_step(Cell cell, Storage st, F&& f) {
  return dispatch(cell, st, Math::kFma, [&](auto c, auto tag, auto) { return f(c, tag); });
}

}  // namespace fused_rnn
