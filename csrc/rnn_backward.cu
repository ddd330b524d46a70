// Persistent backward kernel: the reverse-time recurrence of one chunk and direction, in one
// cooperative launch. It produces the pre-activation gradients of every step (dgx, plus dghn for
// GRU, in the storage type) and dh0/dc0; dx, dW_ih, dW_hh and the bias gradients are time-parallel GEMMs/reductions
// done afterwards by torch (cuBLAS).
//
// What forward saved, and why: the activated gates of every step (in place of x W_ih^T, so it
// costs no memory the forward did not already use), c_t (LSTM) and W_hn h + b_hn (GRU), all fp32.
// Recomputing them instead would repeat the sequential recurrent matmul, the one thing this
// kernel exists to avoid.
//
// Block b owns units [u0, u0 + units) and holds the columns u0.. of W_hh (all G*H rows,
// transposed) in shared memory, for the batch rows of its group (plan.h: batch groups).
// Iteration s = 0 .. T (time t = the forward's s-th last step):
//   1. dh_rec = W_cols^T-slice * dgh_{s-1}: the gradient reaching h_{t} through the next step's
//      recurrent matmul, with dgh_{s-1} read from dgbuf[s % 2] (zeros at s = 0);
//   2. epilogue for (b, u): dh = dh_rec + carry (+ dy[t] on real steps), in fp32 (h is stored
//      rounded, its gradient is not: reference.py _StoreH);
//      cell backward from the saved activations -> dgx[t] and the recurrent-side dgates
//      (dgbuf[(s + 1) % 2], the next tensor-core operand; GRU also dghn[t]), all rounded to the
//      storage type: every later use of them is a matmul operand (here, or the time-parallel
//      GEMMs dx, dW_ih, dW_hh, on 16-bit tensor cores); the carries (GRU z*dh, LSTM dc) stay in
//      fp32 buffers of this block;
//   3. grid.sync() (not after the last iteration; none with the tagged exchange, kStageTagged,
//      whose stage copy waits for the words' tags instead: rnn_forward.cu). At s = T the
//      epilogue writes dh0 instead.
// With K parts (plan.h) step 1 is split across a team of blocks along K = G*H and their partial
// sums meet in p.part after one more grid.sync() (rnn_common.cuh block_step).
// Padding steps (t >= lengths[b]) pass dh and dc through untouched and write zero dgates.
// With clusters (BwdParams::cluster): as in rnn_forward.cu (rnn_common.cuh StepBarrier and
// Exchange). The dgates of iteration T - 1 are read by iteration T, so every iteration that
// writes them publishes to the peers; iteration T only writes dh0, after the last barrier, and
// touches no peer.
#include "rnn_common.cuh"

namespace fused_rnn {
namespace detail {

// The point (batch row b, unit u0 + j) of iteration s (rnn_common.cuh run_points: load, then
// finish). rec(0) is the recurrent matmul's output there, dh_rec: the gradient reaching h
// through W_hh. load reads everything the point needs; finish is the cell's backward and its
// stores.
template <Cell C, typename T, Math M>
struct BackwardPoint {
  static constexpr int G = gates_of(C);
  static constexpr int kBatch = point_batch<T, M>();
  struct In {
    float dh_in;  // dh_rec + the carried dh
    float dy;     // dy[t] (real steps)
    float a[G];   // the saved activations
    float aux;    // LSTM c_t; GRU W_hn h + b_hn
    float cprev;  // LSTM c_{t-1}
    float dc;     // LSTM: the carried dc
    float hp;     // GRU: h_{t-1}
    bool pad;     // a padding step of row b
  };
  const BwdParams& p;
  const ExchangeStep<T>& ex;
  int s, u0;

  // t of a real iteration (s < T): the forward step it differentiates.
  __device__ __forceinline__ int step() const { return p.reverse ? s : p.steps - 1 - s; }

  // Also what a padding step does not use: always readable, and loading it regardless keeps
  // the loads free of the branch on lengths[b].
  template <typename Rec>
  __device__ __forceinline__ In load(int b, int j, Rec&& rec) const {
    const int H = p.hidden, Tn = p.steps, u = u0 + j;
    const size_t bh = (size_t)b * H + u;
    In in{};
    // rec(0) is W_hh times the dgates of iteration s - 1: none at s = 0, and zeros after a
    // padding step of row b. Those are 0 * w, NaN where w is inf, where torch.nn computes
    // nothing, so they are not added (for finite W they are +-0: the same sum, up to a zero's sign).
    const int t_before = p.reverse ? s - 1 : Tn - s;  // the step iteration s - 1 differentiated
    const bool no_rec = s == 0 || (p.lengths != nullptr && t_before >= p.lengths[b]);
    in.dh_in = no_rec ? p.dh_carry[bh] : rec(0) + p.dh_carry[bh];
    if (s == Tn) return in;  // past the first forward step: only dh0 is left
    const int t = step();
    const size_t tbh = ((size_t)t * p.batch + b) * H + u;
    const float* a = p.gates + ((size_t)t * p.batch + b) * G * H + u;  // gate g at a[g * H]
    in.pad = p.lengths != nullptr && t >= p.lengths[b];
    in.dy = to_float(static_cast<const T*>(p.dy)[tbh]);
#pragma unroll
    for (int g = 0; g < G; ++g) in.a[g] = a[(size_t)g * H];
    if constexpr (C == Cell::kLSTM) {
      in.aux = p.aux[tbh];
      // c_{t-1}: the previous step's carried c (aux holds it on padding steps too) or c0.
      const int tp = p.reverse ? t + 1 : t - 1;
      in.cprev = (tp >= 0 && tp < Tn) ? p.aux[((size_t)tp * p.batch + b) * H + u] : p.c0[bh];
      in.dc = p.dc_carry[bh];
    } else if constexpr (C == Cell::kGRU) {
      in.aux = p.aux[tbh];
      in.hp = to_float(static_cast<const T*>(p.hprev)[tbh]);
    }
    return in;
  }

  __device__ __forceinline__ void finish(int b, int j, const In& in) const {
    const int H = p.hidden, Tn = p.steps, u = u0 + j;
    const size_t bh = (size_t)b * H + u;
    if (s == Tn) {
      p.dh0[bh] = in.dh_in;
      return;
    }
    const int t = step();
    const size_t tbh = ((size_t)t * p.batch + b) * H + u;
    const size_t tg = ((size_t)t * p.batch + b) * G * H + u;  // gate g at tg + g * H
    T* dgx = static_cast<T*>(p.dgx);
    if (in.pad) {  // padding step: y[t] is a constant zero
      p.dh_carry[bh] = in.dh_in;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        dgx[tg + (size_t)g * H] = from_float<T>(0.f);
        ex.put(b, u + g * H, from_float<T>(0.f));
      }
      if (C == Cell::kGRU) static_cast<T*>(p.dghn)[tbh] = from_float<T>(0.f);
      return;
    }
    const float dh = in.dh_in + in.dy;
    float dg[G];   // input side (dgx)
    float dgr[G];  // recurrent side (the dgates W_hh multiplies)
    float carry = 0.f;
    if constexpr (C == Cell::kLSTM) {
      const float i = in.a[0], f = in.a[1], gg = in.a[2], o = in.a[3];
      const float tc = tanhf(in.aux);
      const float dc = in.dc + dh * o * (1.f - tc * tc);
      dg[0] = dc * gg * i * (1.f - i);
      dg[1] = dc * in.cprev * f * (1.f - f);
      dg[2] = dc * i * (1.f - gg * gg);
      dg[3] = dh * tc * o * (1.f - o);
      p.dc_carry[bh] = dc * f;
#pragma unroll
      for (int g = 0; g < 4; ++g) dgr[g] = dg[g];
    } else if constexpr (C == Cell::kGRU) {
      const float r = in.a[0], z = in.a[1], nn = in.a[2];
      const float dn = dh * (1.f - z) * (1.f - nn * nn);
      dg[0] = dn * in.aux * r * (1.f - r);
      dg[1] = dh * (in.hp - nn) * z * (1.f - z);
      dg[2] = dn;
      dgr[0] = dg[0];
      dgr[1] = dg[1];
      dgr[2] = dn * r;
      static_cast<T*>(p.dghn)[tbh] = from_float<T>(dgr[2]);
      carry = dh * z;
    } else {
      const float act = in.a[0];
      // relu': torch's rule on the result, zero where act <= 0, so a NaN act passes dh through.
      dg[0] = C == Cell::kRNNTanh ? dh * (1.f - act * act) : (act <= 0.f ? 0.f : dh);
      dgr[0] = dg[0];
    }
    p.dh_carry[bh] = carry;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      dgx[tg + (size_t)g * H] = from_float<T>(dg[g]);
      ex.put(b, u + g * H, from_float<T>(dgr[g]));
    }
  }
};

// L2 prefetch of what BackwardPoint reads from HBM at forward step t for this block's units
// and its group's batch rows: the saved activations of every gate, dy, and
// aux (LSTM c_t, GRU W_hn h + b_hn) and hprev (GRU). (LSTM's c_{t-1} is the next step's aux.)
template <Cell C, typename T, typename W>
__device__ __forceinline__ void prefetch_step(const BwdParams& p, int t, const BlockState<W>& bs) {
  constexpr int G = gates_of(C);
  constexpr int kRuns = G + 1 + (C == Cell::kLSTM || C == Cell::kGRU) + (C == Cell::kGRU);
  const int runs = (bs.n_end - bs.n_begin) * kRuns;
  const int u0 = bs.u0, nu = bs.nu;
  for (int i = threadIdx.x; i < runs; i += kThreads) {
    const int b = bs.n_begin + i / kRuns, r = i % kRuns;
    const size_t tb = (size_t)t * p.batch + b;
    if (r < G) {
      prefetch_run(p.gates + tb * G * p.hidden + (size_t)r * p.hidden + u0, nu);
    } else if (r == G) {
      prefetch_run(static_cast<const T*>(p.dy) + tb * p.hidden + u0, nu);
    } else if (r == G + 1) {
      prefetch_run(p.aux + tb * p.hidden + u0, nu);
    } else {
      prefetch_run(static_cast<const T*>(p.hprev) + tb * p.hidden + u0, nu);
    }
  }
}

// One block per SM by design (the W slice fills shared memory): minBlocks 1 lets ptxas use up
// to 255 registers a thread instead of spilling (it capped some fp32 kernels at 128 on sm_80).
// Tagged: the tagged exchange (fused_rnn.h tagged_exchange; 16-bit storage), no step barrier.
template <Cell C, typename T, Math M, bool Tagged>
__global__ void __launch_bounds__(kThreads, 1) rnn_backward_kernel(const BwdParams p) {
  using W = typename WType<T, M>::type;
  const BlockState<W> bs = block_state<W, M>(
      p.plan, p.hidden, p.batch, p.batch_pad, Tagged ? int(kStageTagged) : p.stage_copy,
      p.tile_block, p.point_batch, p.frag_loads, p.cluster);
  PhaseClock clk(p.prof);
  load_w_backward<W, M>(bs.sw, p.plan, static_cast<const T*>(p.w_hh), p.hidden, bs.team_u0,
                        bs.k0, bs.w_swizzle);
  __syncthreads();
  clk.mark(kPhaseLoad);

  // The forward step of backward iteration s (s < T).
  const auto step_of = [&](int s) { return p.reverse ? s : p.steps - 1 - s; };
  prefetch_step<C, T>(p, step_of(0), bs);
  const StepBarrier bar{p.cluster};
  const Exchange<T> ex =
      make_exchange<T, M, Tagged>(p.dgbuf, p.plan, p.batch_pad, p.cluster, bs.stage, bs.n_begin);
  ex.init(/*load_global=*/false);  // dsmem: zeroed mirrors (iteration 0 reads zeros)
  for (int s = 0; s <= p.steps; ++s) {
    // Iteration T, the last, writes only dh0 (no put); T - 1's dgates are read by T.
    const ExchangeStep<T> xs = ex.step(s, s == p.steps);
    block_step<W, M, Tagged>(bs, p.plan, p.batch, p.batch_pad, xs.in, xs.ld, xs.row0,
                     ex.tags(s, gates_of(C) * p.hidden), p.part, bar, clk,
                     BackwardPoint<C, T, M>{p, xs, s, bs.u0});
    if (s < p.steps) {
      if (s + 1 < p.steps) prefetch_step<C, T>(p, step_of(s + 1), bs);
      if constexpr (!Tagged) bar.sync();  // tagged: the next stage copy waits for the words
      clk.mark(kPhaseSync);
    }
  }
  clk.finish();
}

// The per-step path's backward iteration s (fused_rnn.h StepArgs): one thread a point (b, u),
// rec(0) = dh_rec from the iteration's GEMM. Every other value is BackwardPoint's, as in the
// persistent kernel.
template <Cell C, typename T>
__global__ void __launch_bounds__(kStepThreads)
    rnn_backward_step_kernel(const StepArgs<BwdParams> a) {
  const BwdParams& p = a.p;
  int b, u;
  if (!step_point(p.batch, p.hidden, &b, &u)) return;
  const int H = p.hidden;
  const ExchangeStep<T> ex = step_exchange<T>(p.dgbuf, p.batch, gates_of(C) * H, a.s);
  const BackwardPoint<C, T, kStepMath<T>> pt{p, ex, a.s, 0};
  const float rec = a.rec[(size_t)b * H + u];
  pt.finish(b, u, pt.load(b, u, [&](int) { return rec; }));
}

}  // namespace detail

template <Cell C, typename T, Math M>
cudaError_t launch_backward(const BwdParams& p, cudaStream_t stream) {
  if (p.stage_copy == kStageTagged) {
    if constexpr (sizeof(T) == 2)
      if (detail::tagged_launch<T>(p))
        return detail::launch_chunk(detail::rnn_backward_kernel<C, T, M, true>, p, stream);
    return cudaErrorInvalidValue;  // a plan the tagged exchange cannot take (tagged_launch)
  }
  return detail::launch_chunk(detail::rnn_backward_kernel<C, T, M, false>, p, stream);
}

template <Cell C, typename T>
cudaError_t launch_backward_step(const BwdParams& p, const float* rec, int s, cudaStream_t stream) {
  return detail::launch_points(detail::rnn_backward_step_kernel<C, T>,
                               StepArgs<BwdParams>{p, rec, s}, (long long)p.batch * p.hidden,
                               stream);
}

FRNN_INSTANTIATE(launch_backward, BwdParams)
FRNN_INSTANTIATE_STEP(launch_backward_step, BwdParams)

}  // namespace fused_rnn
