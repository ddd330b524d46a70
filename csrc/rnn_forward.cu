// Persistent forward kernel: one cooperative launch per chunk and direction.
//
// Block b owns hidden units [u0, u0 + units) and keeps their W_hh rows in shared memory for the
// whole chunk (plan.h), for the batch rows of its group (all rows unless plan.groups > 1).
// Per step t:
//   1. gates_hh = W_slice * h_{t-1}^T for its batch rows (chunks of kChunkCols), h_{t-1} read
//      from the exchange buffer hbuf[s % 2] in global memory/L2 (written by all blocks);
//   2. the epilogue adds x W_ih^T (precomputed by one cuBLAS GEMM), b_ih (in that GEMM, or here
//      where p.b_ih is given: the same fp32 sum) and b_hh, applies the cell, keeps c in an fp32
//      buffer that only this block touches, rounds h to the storage type and writes it to y[t]
//      and to hbuf[(s + 1) % 2];
//   3. grid.sync(): hbuf[(s + 1) % 2] is complete. Double buffering makes one sync per step
//      enough: step s+1 overwrites hbuf[s % 2] only after every block passed the sync that
//      ended step s, i.e. finished reading it. With the tagged exchange (kStageTagged, 16-bit
//      only) there is no sync: h travels as words tagged with their step, and step s + 1's
//      stage copy reloads each word until it has the step's tag (rnn_common.cuh Exchange).
// Reads of hbuf after grid.sync() need no volatile/ld.cg: grid.sync() is a gpu-scope
// release/acquire barrier in the CUDA memory model (it fences and invalidates stale L1 lines).
// With K parts (plan.h) step 1 multiplies only this block's K columns for all of its team's
// units, writes the partial sums to p.part and waits at one more grid.sync(); step 2 then adds
// the team's partials for its own units (rnn_common.cuh block_step).
// With clusters (FwdParams::cluster, fused_rnn.h ClusterMode) a grid.sync() becomes the barrier
// of the block's cluster: every one if the cluster is its batch group (groups share nothing, so
// the argument above holds per group), the K parts' one if it is its team. With
// kClusterGroupsDsmem hbuf is replaced, within the cluster, by copies in every block's shared
// memory that each block writes into directly (rnn_common.cuh Exchange); the double-buffering
// argument is the same, per group.
#include "rnn_common.cuh"

namespace fused_rnn {
namespace detail {

// The point (batch row b, unit u0 + j) of step t (rnn_common.cuh run_points: load, then
// finish). load reads everything the point needs; finish is the cell, its stores and the
// exchange. rec(g) is the recurrent pre-activation of gate g (without bias). State and outputs
// are only ever touched by the thread owning (b, u) in this block, so there is no intra-block
// hazard across steps.
template <Cell C, typename T, Math M>
struct ForwardPoint {
  static constexpr int G = gates_of(C);
  static constexpr int kBatch = point_batch<T, M>();
  struct In {
    float pre[G];  // x W_ih^T + b_ih + (W_hh h + b_hh), in the reference's order
    float xn, hn;  // GRU: x W_in^T + b_in and W_hn h + b_hn, the n gate's two halves
    float c;       // LSTM: c_{t-1} (this block's fp32 state)
    T hin;         // h_{t-1} from the exchange buffer
    bool pad;      // a padding step of row b
  };
  const FwdParams& p;
  const ExchangeStep<T>& ex;
  int t, u0;

  // Also what a padding step does not use (the gates): always readable, and loading it
  // regardless keeps the loads free of the branch on lengths[b]. The gates' sums are taken
  // here (fewer values live until finish: the fp16 kernels are at the register limit).
  template <typename Rec>
  __device__ __forceinline__ In load(int b, int j, Rec&& rec) const {
    const int H = p.hidden, u = u0 + j;
    const float* xg = p.xproj + ((size_t)t * p.batch + b) * G * H + u;  // gate g at xg[g * H]
    In in;
    in.pad = p.lengths != nullptr && t >= p.lengths[b];
    in.hin = ex.get(b, u);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float hh = rec(g) + (p.b_hh != nullptr ? p.b_hh[g * H + u] : 0.f);
      // x W_ih^T + b_ih, rounded once as the GEMM's bias epilogue would (no "+ 0.f" without
      // b_ih: it would turn a -0 into +0).
      const float x = p.b_ih != nullptr ? xg[(size_t)g * H] + p.b_ih[g * H + u]
                                        : xg[(size_t)g * H];
      in.pre[g] = x + hh;
      if (C == Cell::kGRU && g == 2) {
        in.xn = x;
        in.hn = hh;
      }
    }
    in.c = C == Cell::kLSTM ? p.cbuf[(size_t)b * H + u] : 0.f;
    return in;
  }

  __device__ __forceinline__ void finish(int b, int j, const In& in) const {
    const int H = p.hidden, u = u0 + j;
    const size_t tbu = ((size_t)t * p.batch + b) * H + u;   // (T, B, H) tensors
    float* xg = p.xproj + ((size_t)t * p.batch + b) * G * H + u;
    T* y = static_cast<T*>(p.y);
    if (in.pad) {  // padding step: keep state, output zero
      ex.put(b, u, in.hin);
      y[tbu] = from_float<T>(0.f);
      // aux is written on every step so no output element is left uninitialised: LSTM keeps
      // the carried c (backward reads it as the next step's c_{t-1}), GRU's value is unused.
      if (C == Cell::kLSTM && p.save) p.aux[tbu] = in.c;
      if (C == Cell::kGRU && p.save) p.aux[tbu] = 0.f;
      return;
    }
    const float* pre = in.pre;
    float h;
    if constexpr (C == Cell::kLSTM) {
      const float i = sigmoidf(pre[0]), f = sigmoidf(pre[1]), gg = tanhf(pre[2]),
                  o = sigmoidf(pre[3]);
      const float c = f * in.c + i * gg;
      h = o * tanhf(c);
      p.cbuf[(size_t)b * H + u] = c;
      if (p.save) {
        xg[0] = i; xg[(size_t)H] = f; xg[(size_t)2 * H] = gg; xg[(size_t)3 * H] = o;
        p.aux[tbu] = c;
      }
    } else if constexpr (C == Cell::kGRU) {
      const float r = sigmoidf(pre[0]), z = sigmoidf(pre[1]);
      const float nn = tanhf(in.xn + r * in.hn);  // b_hn inside r * (.)
      const float hp = to_float(in.hin);
      h = nn + z * (hp - nn);
      if (p.save) {
        xg[0] = r; xg[(size_t)H] = z; xg[(size_t)2 * H] = nn;
        p.aux[tbu] = in.hn;
      }
    } else {
      // relu as torch computes it: NaN stays NaN (fmaxf(NaN, 0) is 0), -0 stays -0.
      h = C == Cell::kRNNTanh ? tanhf(pre[0]) : (pre[0] < 0.f ? 0.f : pre[0]);
      if (p.save) xg[0] = h;  // activation before rounding: what tanh'/relu' need
    }
    const T hs = from_float<T>(h);
    ex.put(b, u, hs);
    y[tbu] = hs;
  }
};

// L2 prefetch of what ForwardPoint reads from HBM at step t: x W_ih^T + b_ih of this block's
// units, every gate, for its group's batch rows.
template <Cell C, typename W>
__device__ __forceinline__ void prefetch_step(const FwdParams& p, int t, const BlockState<W>& bs) {
  constexpr int G = gates_of(C);
  const int runs = (bs.n_end - bs.n_begin) * G;
  for (int i = threadIdx.x; i < runs; i += kThreads) {
    const int b = bs.n_begin + i / G, g = i % G;
    prefetch_run(
        p.xproj + ((size_t)t * p.batch + b) * G * p.hidden + (size_t)g * p.hidden + bs.u0, bs.nu);
  }
}

// One block per SM by design (the W slice fills shared memory): minBlocks 1 lets ptxas use up
// to 255 registers a thread instead of spilling (it capped some fp32 kernels at 128 on sm_80).
// Tagged: the tagged exchange (fused_rnn.h tagged_exchange; 16-bit storage), no step barrier.
template <Cell C, typename T, Math M, bool Tagged>
__global__ void __launch_bounds__(kThreads, 1) rnn_forward_kernel(const FwdParams p) {
  using W = typename WType<T, M>::type;
  const BlockState<W> bs = block_state<W, M>(
      p.plan, p.hidden, p.batch, p.batch_pad, Tagged ? int(kStageTagged) : p.stage_copy,
      p.tile_block, p.point_batch, p.frag_loads, p.cluster);
  PhaseClock clk(p.prof);
  load_w_forward<W, M>(bs.sw, p.plan, static_cast<const T*>(p.w_hh), p.hidden, gates_of(C),
                       bs.team_u0, bs.k0, bs.w_swizzle);
  __syncthreads();
  clk.mark(kPhaseLoad);

  prefetch_step<C>(p, p.reverse ? p.steps - 1 : 0, bs);
  const StepBarrier bar{p.cluster};
  // W == T for every (storage, math) pair (WType), so the mirror lives in the stage's place.
  const Exchange<T> ex =
      make_exchange<T, M, Tagged>(p.hbuf, p.plan, p.batch_pad, p.cluster, bs.stage, bs.n_begin);
  ex.init(/*load_global=*/true);  // dsmem: h0 into the mirrors (else nothing)
  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? p.steps - 1 - s : s;
    const ExchangeStep<T> xs = ex.step(s, s + 1 == p.steps);
    block_step<W, M, Tagged>(bs, p.plan, p.batch, p.batch_pad, xs.in, xs.ld, xs.row0,
                     ex.tags(s, p.hidden), p.part, bar, clk,
                     ForwardPoint<C, T, M>{p, xs, t, bs.u0});
    if (s + 1 < p.steps) {
      prefetch_step<C>(p, p.reverse ? t - 1 : t + 1, bs);
      if constexpr (!Tagged) bar.sync();  // tagged: the next stage copy waits for the words
      clk.mark(kPhaseSync);
    }
  }
  ex.finish(p.steps, bs.n_end, bs.u0, bs.nu);  // dsmem: h_T of this block's units to hbuf
  clk.finish();
}

// The per-step path's forward step s (fused_rnn.h StepArgs): one thread a point (b, u), rec(g)
// from the step's GEMM. Every other value is ForwardPoint's, as in the persistent kernel.
template <Cell C, typename T>
__global__ void __launch_bounds__(kStepThreads)
    rnn_forward_step_kernel(const StepArgs<FwdParams> a) {
  const FwdParams& p = a.p;
  int b, u;
  if (!step_point(p.batch, p.hidden, &b, &u)) return;
  const int H = p.hidden;
  const ExchangeStep<T> ex = step_exchange<T>(p.hbuf, p.batch, H, a.s);
  const ForwardPoint<C, T, kStepMath<T>> pt{p, ex, p.reverse ? p.steps - 1 - a.s : a.s, 0};
  const float* rec = a.rec + (size_t)b * gates_of(C) * H + u;  // gate g at rec[g * H]
  pt.finish(b, u, pt.load(b, u, [&](int g) { return rec[(size_t)g * H]; }));
}

}  // namespace detail

template <Cell C, typename T, Math M>
cudaError_t launch_forward(const FwdParams& p, cudaStream_t stream) {
  if (p.stage_copy == kStageTagged) {
    if constexpr (sizeof(T) == 2)
      if (detail::tagged_launch<T>(p))
        return detail::launch_chunk(detail::rnn_forward_kernel<C, T, M, true>, p, stream);
    return cudaErrorInvalidValue;  // a plan the tagged exchange cannot take (tagged_launch)
  }
  return detail::launch_chunk(detail::rnn_forward_kernel<C, T, M, false>, p, stream);
}

template <Cell C, typename T>
cudaError_t launch_forward_step(const FwdParams& p, const float* rec, int s, cudaStream_t stream) {
  return detail::launch_points(detail::rnn_forward_step_kernel<C, T>,
                               StepArgs<FwdParams>{p, rec, s}, (long long)p.batch * p.hidden,
                               stream);
}

cudaError_t kernel_image(int* binary_version, int* ptx_version) {
  cudaFuncAttributes attrs{};
  const cudaError_t err = cudaFuncGetAttributes(
      &attrs, reinterpret_cast<const void*>(
                  detail::rnn_forward_kernel<Cell::kLSTM, float, Math::kFma, false>));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  *binary_version = attrs.binaryVersion;
  *ptx_version = attrs.ptxVersion;
  return cudaSuccess;
}

FRNN_INSTANTIATE(launch_forward, FwdParams)
FRNN_INSTANTIATE_STEP(launch_forward_step, FwdParams)

}  // namespace fused_rnn
