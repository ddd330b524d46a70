// C entry points for tests/cuda/simulate.py: what csrc/binding.cpp does between its tensor
// checks and the launch (plan, params, dispatch), over raw pointers the caller allocated the
// way the binding does. The launch itself is csrc/'s launch_forward/launch_backward, unchanged.
#include "sim_api.h"

#include <cstdio>

#include "cudasim.h"
#include "fused_rnn.h"  // from -I csrc

using fused_rnn::Cell;
using fused_rnn::Math;
using fused_rnn::Plan;

namespace {

std::string g_error;  // the last entry point's failure

// binding.cpp's checked_plan on the simulated device (dtype codes are fused_rnn::Storage's).
// Returns false (and sets g_error) when the binding would refuse.
bool checked_plan(int cell, int dtype, int allow_tf32, int hidden, bool backward, int batch_pad,
                  int max_groups, int max_stage_k, int k_parts, int max_blocks,
                  int cluster_max, int team_clusters, int dsmem, fused_rnn::Selection* sel,
                  int* mode) {
  const cudasim::Config& c = cudasim::config();
  if (cell < 0 || cell > 3 || dtype < 0 || dtype > 2 || hidden <= 0 || max_groups < 1 ||
      batch_pad <= 0 || batch_pad % fused_rnn::kBatchPad != 0 || max_stage_k < 0 ||
      k_parts < 0 || max_blocks < 0 || cluster_max < 0 || cluster_max > 16) {
    g_error = "bad cell, dtype, hidden size, batch padding, max_groups, k_parts, max_blocks or "
              "cluster";
    return false;
  }
  const fused_rnn::LaunchChoice choice = fused_rnn::choose_launch(
      static_cast<Cell>(cell), dtype != 0, allow_tf32 != 0, hidden, backward, c.sms, c.smem_optin,
      batch_pad, max_groups, max_stage_k, k_parts, max_blocks, cluster_max, team_clusters != 0,
      /*has_clusters=*/true, dsmem != 0);  // the simulated device is sm_90
  *sel = choice.sel;
  *mode = choice.cluster;
  if (sel->plan.smem_bytes > c.smem_optin) {
    g_error = "hidden size needs more shared memory than the device allows";
    return false;
  }
  return true;
}

// binding.cpp's FRNN_CHECK_CUDA after the launch, and what follows it on a GPU. `pending`: the
// error left pending in cudaGetLastError when the entry point was called (someone else's).
int finish(cudaError_t err, cudaError_t pending) {
  const std::string failed = cudasim::kernel_failure();  // the stream's sync, on a GPU
  if (err != cudaSuccess) (void)cudaGetLastError();       // FRNN_CHECK_CUDA clears it
  if (err == cudaSuccess && !failed.empty()) {
    g_error = std::string(cudaGetErrorName(cudaErrorLaunchFailure)) + ": " + failed;
    return static_cast<int>(cudaErrorLaunchFailure);
  }
  // A call that returned success must not leave an error of its own pending (a refusal it
  // took for one and did not clear): torch's next kernel launch check (cudaGetLastError)
  // would raise it, from another operation.
  const cudaError_t left = cudaPeekAtLastError();
  if (err == cudaSuccess && left != cudaSuccess && left != pending) {
    g_error = std::string(cudaGetErrorName(left)) + " left pending in cudaGetLastError by a "
              "launch that succeeded (torch's next launch check would raise it)";
    return static_cast<int>(left);
  }
  if (err == cudaSuccess) {
    g_error.clear();
    return 0;
  }
  g_error = std::string(cudaGetErrorName(err));
  if (!cudasim::last_message().empty()) g_error += ": " + cudasim::last_message();
  return static_cast<int>(err);
}

// The counts and lengths every launch fills alike, persistent or per step (binding.cpp
// forward_params/backward_params). The per-step launches' exchange buffer has no padding
// rows, so their batch_pad is the batch; the persistent ones set their plan's after.
template <typename Params>
void fill_step(Params& p, int steps, int batch, int hidden, int reverse, const int* lengths) {
  p.steps = steps;
  p.batch = batch;
  p.hidden = hidden;
  p.batch_pad = batch;
  p.reverse = reverse != 0;
  p.lengths = lengths;
}

// The launch fields FwdParams and BwdParams share, and the plan (binding.cpp checks and fills
// the same); false when the plan is refused (sim_last_error says why).
template <typename Params>
bool fill_common(Params& p, fused_rnn::Selection& sel, int cell, int dtype, int allow_tf32,
                 int steps, int batch, int hidden, int batch_pad, int reverse, bool backward,
                 int max_groups, int max_stage_k, int k_parts, int max_blocks, int cluster_max,
                 int team_clusters, int dsmem, const void* w_hh, const int* lengths,
                 long long* prof, int stage_copy, int tile_block, int point_batch,
                 int frag_loads, float* part) {
  int mode = fused_rnn::kClusterNone;
  if (!checked_plan(cell, dtype, allow_tf32, hidden, backward, batch_pad, max_groups,
                    max_stage_k, k_parts, max_blocks, cluster_max, team_clusters, dsmem, &sel,
                    &mode))
    return false;
  p.cluster = mode;
  p.plan = sel.plan;
  fill_step(p, steps, batch, hidden, reverse, lengths);
  p.batch_pad = batch_pad;
  p.w_hh = w_hh;
  p.prof = prof;
  p.stage_copy = stage_copy;
  p.tile_block = tile_block;
  p.point_batch = point_batch;
  p.frag_loads = frag_loads;
  p.part = sel.plan.parts > 1 ? part : nullptr;
  if (sel.plan.parts > 1 && part == nullptr) {
    g_error = "the plan has K parts but no partial buffer was given";
    return false;
  }
  return true;
}

// The per-step entry points' own check (the persistent ones' is checked_plan's): false, and
// g_error set, for a cell or dtype code out of range.
bool valid_step(int cell, int dtype) {
  if (cell >= 0 && cell <= 3 && dtype >= 0 && dtype <= 2) return true;
  g_error = "bad cell or dtype";
  return false;
}

// The step launch `launch` for the runtime (cell, storage), and finish()'s report of it.
template <typename Launch>
int run_step(int cell, int dtype, cudaError_t pending, Launch&& launch) {
  return finish(fused_rnn::dispatch_step(static_cast<Cell>(cell),
                                         static_cast<fused_rnn::Storage>(dtype), launch),
                pending);
}

// The inputs and buffers of a forward launch, either path (binding.cpp forward_params).
void fill_forward(fused_rnn::FwdParams& p, int save, const float* b_hh, const float* b_ih,
                  float* xproj, void* hbuf, float* cbuf, void* y, float* aux) {
  p.save = save != 0;
  p.b_hh = b_hh;
  p.b_ih = b_ih;
  p.xproj = xproj;
  p.hbuf = hbuf;
  p.cbuf = cbuf;
  p.y = y;
  p.aux = aux;
}

// The inputs and buffers of a backward launch, either path (binding.cpp backward_params).
void fill_backward(fused_rnn::BwdParams& p, const void* dy, const float* gates,
                   const float* aux, const float* c0, const void* hprev, void* dgbuf,
                   float* dh_carry, float* dc_carry, void* dgx, void* dghn, float* dh0) {
  p.dy = dy;
  p.gates = gates;
  p.aux = aux;
  p.c0 = c0;
  p.hprev = hprev;
  p.dgbuf = dgbuf;
  p.dh_carry = dh_carry;
  p.dc_carry = dc_carry;
  p.dgx = dgx;
  p.dghn = dghn;
  p.dh0 = dh0;
}

}  // namespace

extern "C" {

int sim_configure(int sms, int smem_optin, int smem_per_sm, int order, uint64_t seed,
                  int cp_async_early, int max_clusters, int ptx_version) {
  cudasim::Config c;
  c.sms = sms;
  c.smem_optin = smem_optin;
  c.smem_per_sm = smem_per_sm;
  c.order = order;
  c.seed = seed;
  c.cp_async_early = cp_async_early != 0;
  c.max_clusters = max_clusters;
  c.ptx_version = ptx_version;
  cudasim::configure(c);
  return 0;
}

const char* sim_last_error() { return g_error.c_str(); }

void sim_set_cuda_error(int code) { cudasim::set_last_error(code); }

// The calls the device refuses from now on (sim_api.h Refuse; 0: none).
void sim_refuse(int calls) { cudasim::refuse(static_cast<unsigned>(calls)); }

// Gives the simulated threads' stacks back to the OS (runtime.cpp Stack): 0, or -1 during a
// launch.
int sim_release_stacks() { return cudasim::release_stacks() ? 0 : -1; }

// out[0..20]: math, then Plan's fields in declaration order (units .. part_ld), then the
// ClusterMode.
int sim_plan(int cell, int dtype, int allow_tf32, int hidden, int backward, int batch_pad,
             int max_groups, int max_stage_k, int k_parts, int max_blocks, int cluster_max,
             int team_clusters, int dsmem, int* out) {
  fused_rnn::Selection sel{};
  int mode = fused_rnn::kClusterNone;
  if (!checked_plan(cell, dtype, allow_tf32, hidden, backward != 0, batch_pad, max_groups,
                    max_stage_k, k_parts, max_blocks, cluster_max, team_clusters, dsmem, &sel,
                    &mode))
    return 1;
  const Plan& p = sel.plan;
  const int v[] = {static_cast<int>(sel.math), p.units, p.blocks, p.m_rows, p.m_pad, p.k, p.k_pad,
                   p.ldw, p.slots, p.slot_floats, p.w_bytes, p.smem_bytes, p.groups,
                   p.group_blocks, p.stage_rows, p.stage_k, p.stage_ld, p.parts, p.k_part,
                   p.part_ld, mode};
  for (int i = 0; i < 21; ++i) out[i] = v[i];
  return 0;
}

// binding.cpp's plan_info: make_plan as compiled here, for any math, grid limit and groups.
int sim_make_plan(int cell, int math, int hidden, int backward, int max_blocks, int groups,
                  int stage_rows, int stage_k, int parts, int* out) {
  if (cell < 0 || cell > 3 || math < 0 || math > 2 || hidden <= 0 || max_blocks <= 0 ||
      groups < 1 || groups > max_blocks || parts < 1 || parts > max_blocks)
    return 1;
  const Plan p = fused_rnn::make_plan(static_cast<Cell>(cell), static_cast<Math>(math), hidden,
                                      backward != 0, max_blocks, groups, stage_rows, stage_k,
                                      parts);
  const int v[] = {p.units,       p.blocks,      p.m_rows,     p.m_pad,      p.k,
                   p.k_pad,       p.ldw,         p.slots,      p.slot_floats, p.w_bytes,
                   p.smem_bytes,  p.groups,      p.group_blocks, p.stage_rows, p.stage_k,
                   p.stage_ld,    p.parts,       p.k_part,     p.part_ld};
  for (int i = 0; i < 19; ++i) out[i] = v[i];
  return 0;
}

int sim_forward(int cell, int dtype, int allow_tf32, int steps, int batch, int hidden,
                int batch_pad, int reverse, int save, int max_groups, int max_stage_k,
                int k_parts, int max_blocks, int cluster_max, int team_clusters, int dsmem,
                const void* w_hh,
                const float* b_hh,
                const int* lengths,
                float* xproj, void* hbuf, float* cbuf, void* y, float* aux, long long* prof,
                int stage_copy, int tile_block, int point_batch, float* part,
                const float* b_ih, int frag_loads) {
  const cudaError_t pending = cudaPeekAtLastError();
  fused_rnn::FwdParams p{};
  fused_rnn::Selection sel{};
  if (!fill_common(p, sel, cell, dtype, allow_tf32, steps, batch, hidden, batch_pad, reverse,
                   false, max_groups, max_stage_k, k_parts, max_blocks, cluster_max,
                   team_clusters, dsmem, w_hh,
                   lengths, prof,
                   stage_copy, tile_block, point_batch, frag_loads,
                   part))
    return 1;
  fill_forward(p, save, b_hh, b_ih, xproj, hbuf, cbuf, y, aux);
  const auto launch = [&](auto c, auto tag, auto m) {
    using T = typename decltype(tag)::type;
    return fused_rnn::launch_forward<decltype(c)::value, T, decltype(m)::value>(p, nullptr);
  };
  return finish(fused_rnn::dispatch(static_cast<Cell>(cell), static_cast<fused_rnn::Storage>(dtype),
                                    sel.math, launch), pending);
}

int sim_backward(int cell, int dtype, int allow_tf32, int steps, int batch, int hidden,
                 int batch_pad, int reverse, int max_groups, int max_stage_k, int k_parts,
                 int max_blocks, int cluster_max, int team_clusters, int dsmem,
                 const void* w_hh, const int* lengths, const void* dy, const float* gates,
                 const float* aux, const float* c0, const void* hprev, void* dgbuf,
                 float* dh_carry, float* dc_carry, void* dgx, void* dghn, float* dh0,
                 long long* prof, int stage_copy, int tile_block, int point_batch,
                 float* part, int frag_loads) {
  const cudaError_t pending = cudaPeekAtLastError();
  fused_rnn::BwdParams p{};
  fused_rnn::Selection sel{};
  if (!fill_common(p, sel, cell, dtype, allow_tf32, steps, batch, hidden, batch_pad, reverse,
                   true, max_groups, max_stage_k, k_parts, max_blocks, cluster_max,
                   team_clusters, dsmem, w_hh,
                   lengths, prof,
                   stage_copy, tile_block, point_batch, frag_loads,
                   part))
    return 1;
  fill_backward(p, dy, gates, aux, c0, hprev, dgbuf, dh_carry, dc_carry, dgx, dghn, dh0);
  const auto launch = [&](auto c, auto tag, auto m) {
    using T = typename decltype(tag)::type;
    return fused_rnn::launch_backward<decltype(c)::value, T, decltype(m)::value>(p, nullptr);
  };
  return finish(fused_rnn::dispatch(static_cast<Cell>(cell), static_cast<fused_rnn::Storage>(dtype),
                                    sel.math, launch), pending);
}

// binding.cpp forward_steps' launch of step s (the caller ran the step's GEMM into rec): the
// params it fills, over buffers allocated as it allocates them (hbuf (2, B, H)).
int sim_forward_step(int cell, int dtype, int steps, int batch, int hidden, int reverse,
                     int save, int s, const float* b_hh, const float* b_ih, const int* lengths,
                     float* xproj, void* hbuf, float* cbuf, void* y, float* aux,
                     const float* rec) {
  const cudaError_t pending = cudaPeekAtLastError();
  if (!valid_step(cell, dtype)) return 1;
  fused_rnn::FwdParams p{};
  fill_step(p, steps, batch, hidden, reverse, lengths);
  fill_forward(p, save, b_hh, b_ih, xproj, hbuf, cbuf, y, aux);
  return run_step(cell, dtype, pending, [&](auto c, auto tag) {
    using T = typename decltype(tag)::type;
    return fused_rnn::launch_forward_step<decltype(c)::value, T>(p, rec, s, nullptr);
  });
}

// binding.cpp backward_steps' launch of iteration s (dgbuf (2, B, G*H)).
int sim_backward_step(int cell, int dtype, int steps, int batch, int hidden, int reverse, int s,
                      const int* lengths, const void* dy, const float* gates, const float* aux,
                      const float* c0, const void* hprev, void* dgbuf, float* dh_carry,
                      float* dc_carry, void* dgx, void* dghn, float* dh0, const float* rec) {
  const cudaError_t pending = cudaPeekAtLastError();
  if (!valid_step(cell, dtype)) return 1;
  fused_rnn::BwdParams p{};
  fill_step(p, steps, batch, hidden, reverse, lengths);
  fill_backward(p, dy, gates, aux, c0, hprev, dgbuf, dh_carry, dc_carry, dgx, dghn, dh0);
  return run_step(cell, dtype, pending, [&](auto c, auto tag) {
    using T = typename decltype(tag)::type;
    return fused_rnn::launch_backward_step<decltype(c)::value, T>(p, rec, s, nullptr);
  });
}

// How many wmma::mma_sync calls (one a warp) all launches so far made.
long long sim_mma_count() { return cudasim::mma_count(); }

// How many accumulator stores (one a warp and tile) all launches so far made: all of them
// (shared = 0), or those through the .shared form (shared = 1; rnn_common.cuh frag_load).
long long sim_frag_stores(int shared) { return cudasim::frag_store_count(shared != 0); }

// How many batches of points (one a thread and batch) all launches so far ran.
long long sim_point_batch_count() { return cudasim::point_batch_count(); }

// How many mma.sync instructions (one a warp) all launches so far issued (the TF32 mma path).
long long sim_mma_sync_count() { return cudasim::mma_sync_count(); }

// The 8 x 8 matrices all ldmatrix instructions so far read (wavefronts = 0), or the
// shared-memory wavefronts they took (wavefronts = 1; cudasim.h ldmatrix_wavefronts): equal
// where no read had a bank conflict.
long long sim_ldmatrix_count(int wavefronts) { return cudasim::ldmatrix_count(wavefronts != 0); }

// The last persistent launch as its params gave it, and its number (sim_api.h last_launch):
// the field count (0 before the first), and the fields copied to out[0..n).
int sim_last_launch(int* out, int n) {
  const std::vector<int>& v = cudasim::last_launch();
  for (int i = 0; i < n && i < static_cast<int>(v.size()); ++i) out[i] = v[i];
  return static_cast<int>(v.size());
}

// The current stream in this thread (sim_api.h set_current_stream), and the launches so far
// that named it and another one.
void sim_set_current_stream(uintptr_t stream) { cudasim::set_current_stream(stream); }
void sim_stream_launches(long long* on, long long* off) { cudasim::stream_launches(on, off); }

// The calling thread's current device, and setting it (sim_api.h set_current_device).
int sim_current_device() {
  int device = -1;
  cudaGetDevice(&device);
  return device;
}
void sim_set_current_device(int device) { cudasim::set_current_device(device); }

// How many launches ran as clusters (fused_rnn.h cluster_launches).
long long sim_cluster_launches() { return fused_rnn::cluster_launches; }

}  // extern "C"
