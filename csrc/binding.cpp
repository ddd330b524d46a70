// The one C++ file that sees torch: checks every tensor (device, dtype, shape, contiguity),
// allocates outputs and workspaces, fills the params structs of fused_rnn.h, and launches on the
// current stream of the tensors' device. Kernels (.cu) see only raw pointers.
//
// Called from fused_rnn/ops/cuda/ops.py, which computes x W_ih^T + b_ih and the
// time-parallel gradient GEMMs with torch and makes inputs contiguous and of the right dtype.
#include <torch/extension.h>
#include <torch/version.h>

// Only c10's light CUDA headers (no ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE
// headers, which a CUDA toolkit of nvcc alone lacks; CI syntax-checks this file with g++).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "fused_rnn.h"

namespace {

using fused_rnn::Cell;
using fused_rnn::Math;
using fused_rnn::Plan;

// On failure the runtime's per-thread error is cleared too (as c10's checks do), so that the
// next successful call, ours or torch's, does not report this one again.
#define FRNN_CHECK_CUDA(expr)                                                                \
  do {                                                                                       \
    const cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess) (void)cudaGetLastError();                                       \
    TORCH_CHECK(err_ == cudaSuccess, "fused_rnn CUDA backend: ", #expr, " failed: ",         \
                cudaGetErrorName(err_), " (", cudaGetErrorString(err_), ")",                 \
                err_ == cudaErrorCooperativeLaunchTooLarge                                   \
                    ? "; the grid does not fit on the GPU at once (another process using it?)" \
                    : "");                                                                   \
  } while (0)

// Numbers in error messages go through std::to_string (num, dims), never an iostream. On the
// lent H200 (torch 2.11, extension built there by its own g++) every refusal that streamed an
// integer (a shape, a mode code) died of a segmentation fault inside the
// std::ostream::_M_insert<long> that this library itself carried, instead of raising; refusals
// of strings, dtypes and devices raised as they should (tests/cuda/binding_refusals.py).
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

Cell cell_of(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "fused_rnn CUDA backend: mode code must be 0 (LSTM), ",
              "1 (GRU), 2 (RNN_TANH) or 3 (RNN_RELU), got ", num(mode));
  return static_cast<Cell>(mode);
}

void check_dtype(c10::ScalarType st) {
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "fused_rnn CUDA backend: dtype must be float32, float16 or bfloat16, got ", st);
}

void check(const at::Tensor& t, const char* name, const at::Device& dev, c10::ScalarType dtype,
           at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == dev, "fused_rnn CUDA backend: ", name, " must be on ", dev,
              " (like the other inputs), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_rnn CUDA backend: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fused_rnn CUDA backend: ", name, " must have shape ",
              dims(shape), ", got ", dims(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), "fused_rnn CUDA backend: ", name, " must be contiguous");
}

const at::Tensor& required(const c10::optional<at::Tensor>& t, const char* name, const char* why) {
  TORCH_CHECK(t.has_value() && t->defined(), "fused_rnn CUDA backend: ", name,
              " is required ", why);
  return *t;
}

const int* lengths_ptr(const c10::optional<at::Tensor>& lengths, const at::Device& dev,
                       int64_t batch) {
  if (!lengths.has_value() || !lengths->defined()) return nullptr;
  check(*lengths, "lengths", dev, at::kInt, {batch});
  return lengths->data_ptr<int>();
}

// The optional phase-timing buffer (fused_rnn.h: kProfSlots int64 per block), or nullptr.
long long* prof_ptr(const c10::optional<at::Tensor>& prof, const at::Device& dev,
                    const Plan& plan) {
  if (!prof.has_value() || !prof->defined()) return nullptr;
  TORCH_CHECK(prof->device() == dev && prof->scalar_type() == at::kLong && prof->is_contiguous(),
              "fused_rnn CUDA backend: prof must be a contiguous int64 tensor on ", dev);
  TORCH_CHECK(prof->numel() >= static_cast<int64_t>(plan.blocks) * fused_rnn::kProfSlots,
              "fused_rnn CUDA backend: prof needs ", num(plan.blocks), " x ",
              num(fused_rnn::kProfSlots), " elements for this launch, got ", num(prof->numel()));
  return reinterpret_cast<long long*>(prof->data_ptr<int64_t>());
}

int checked_tile_block(int64_t tiles) {
  TORCH_CHECK(tiles == 1 || tiles == 2 || tiles == 4,
              "fused_rnn CUDA backend: tile_block must be 1, 2 or 4, got ", num(tiles));
  return static_cast<int>(tiles);
}

int checked_point_batch(int64_t batch) {
  TORCH_CHECK(batch == 0 || batch == 1,
              "fused_rnn CUDA backend: point_batch must be 0 (batches) or 1, got ", num(batch));
  return static_cast<int>(batch);
}

int checked_frag_loads(int64_t mode) {
  TORCH_CHECK(mode == fused_rnn::kFragShared || mode == fused_rnn::kFragGeneric ||
                  mode == fused_rnn::kFragMma,
              "fused_rnn CUDA backend: frag_loads must be 0 (shared), 1 (generic) or 2 (mma), "
              "got ", num(mode));
  return static_cast<int>(mode);
}

int checked_stage_copy(int64_t mode) {
  TORCH_CHECK(mode >= fused_rnn::kStageRegisters && mode <= fused_rnn::kStageTagged,
              "fused_rnn CUDA backend: stage_copy must be 0 (registers), 1 (cp.async), 2 ",
              "(pipelined cp.async) or 3 (tagged), got ", num(mode));
  return static_cast<int>(mode);
}

struct DeviceInfo {
  int sms, smem_optin, major, minor, cooperative;
};

DeviceInfo device_attributes(int index) {
  DeviceInfo d{};
  FRNN_CHECK_CUDA(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, index));
  FRNN_CHECK_CUDA(
      cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  FRNN_CHECK_CUDA(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, index));
  FRNN_CHECK_CUDA(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, index));
  FRNN_CHECK_CUDA(cudaDeviceGetAttribute(&d.cooperative, cudaDevAttrCooperativeLaunch, index));
  return d;
}

fused_rnn::Storage storage_of(c10::ScalarType st) {
  return st == at::kBFloat16 ? fused_rnn::Storage::kBFloat16
       : st == at::kHalf     ? fused_rnn::Storage::kFloat16
                             : fused_rnn::Storage::kFloat32;
}

// The kernels count steps and batch rows in int (FwdParams, BwdParams; ops.py checks first):
// the backward's loop runs steps + 1 iterations (s = 0 .. steps), and a block's batch chunks
// step n0 by kChunkCols up to the padded batch, so neither counter may pass INT_MAX.
constexpr int64_t kMaxSteps = INT_MAX - 1;
constexpr int64_t kMaxRows = INT_MAX - fused_rnn::kBatchPad - fused_rnn::kChunkCols;
void check_counts(int64_t T, int64_t B) {
  TORCH_CHECK(T <= kMaxSteps && B <= kMaxRows, "fused_rnn CUDA backend: at most ",
              num(kMaxSteps), " steps and ", num(kMaxRows), " batch rows per launch, got T=",
              num(T), ", B=", num(B));
}

// The kernels' hidden sizes (plan.h works in int; the Python side refuses far smaller sizes
// first, unsupported_reason): the persistent and the per-step paths alike.
constexpr int64_t kMaxHidden = int64_t(1) << 20;
void check_hidden(int64_t H) {
  TORCH_CHECK(H > 0 && H <= kMaxHidden, "fused_rnn CUDA backend: bad hidden size ", num(H),
              " (1 to ", num(kMaxHidden), ")");
}

// The math, the launch plan and which blocks form clusters (*mode, ClusterMode): plan.h
// choose_launch for this device, checked against its shared memory.
// The Python side refuses unsupported sizes before getting here (unsupported_reason); this is
// the backstop.
fused_rnn::Selection checked_plan(Cell cell, c10::ScalarType st, bool allow_tf32, int64_t hidden,
                                  bool backward, const at::Device& dev, int64_t batch_pad,
                                  int64_t max_groups, int64_t max_stage_k, int64_t k_parts,
                                  int64_t max_blocks, int64_t cluster, bool team_clusters,
                                  bool dsmem, int* mode) {
  const DeviceInfo d = device_attributes(dev.index());
  TORCH_CHECK(d.major >= 8, "fused_rnn CUDA backend: needs compute capability >= 8.0, got ",
              num(d.major), ".", num(d.minor));
  TORCH_CHECK(d.cooperative, "fused_rnn CUDA backend: device ", num(dev.index()),
              " does not support cooperative launches");
  check_hidden(hidden);
  TORCH_CHECK(max_groups >= 1, "fused_rnn CUDA backend: max_groups must be >= 1, got ",
              num(max_groups));
  TORCH_CHECK(max_stage_k >= 0, "fused_rnn CUDA backend: max_stage_k must be >= 0, got ",
              num(max_stage_k));
  TORCH_CHECK(k_parts >= 0, "fused_rnn CUDA backend: k_parts must be >= 0 (0: auto), got ",
              num(k_parts));
  TORCH_CHECK(max_blocks >= 0,
              "fused_rnn CUDA backend: max_blocks must be >= 0 (0: one block per SM), got ",
              num(max_blocks));
  TORCH_CHECK(cluster >= 0 && cluster <= 16,
              "fused_rnn CUDA backend: cluster must be 0 (off) or 1..16 blocks, got ",
              num(cluster));
  const int groups_cap = static_cast<int>(std::min<int64_t>(max_groups, 1 << 16));
  const int stage_cap = static_cast<int>(std::min<int64_t>(max_stage_k, 1 << 30));
  const int parts_cap = static_cast<int>(std::min<int64_t>(k_parts, 1 << 16));
  const fused_rnn::LaunchChoice choice = fused_rnn::choose_launch(
      cell, st != at::kFloat, allow_tf32, static_cast<int>(hidden), backward, d.sms,
      d.smem_optin, static_cast<int>(batch_pad), groups_cap, stage_cap, parts_cap,
      static_cast<int>(std::min<int64_t>(max_blocks, 1 << 16)), static_cast<int>(cluster),
      team_clusters, /*has_clusters=*/d.major >= 9, dsmem);
  const fused_rnn::Selection& sel = choice.sel;
  *mode = choice.cluster;
  const Plan& plan = sel.plan;
  TORCH_CHECK(plan.smem_bytes <= d.smem_optin, "fused_rnn CUDA backend: hidden_size=", num(hidden),
              " needs ", num(plan.smem_bytes), " bytes of shared memory per block (",
              num(plan.blocks), " blocks of ", num(plan.units), " units, ",
              backward ? "backward" : "forward", "); this GPU allows ", num(d.smem_optin));
  return sel;
}

// The K parts' partial sums (plan.h): (parts, B_pad, part_ld) fp32 scratch, or undefined without
// parts. Every element the kernels read they wrote earlier in the same step, so no zeroing.
at::Tensor part_buffer(const Plan& plan, int64_t batch_pad, const at::TensorOptions& f32) {
  if (plan.parts == 1) return at::Tensor();
  return at::empty({plan.parts, batch_pad, plan.part_ld}, f32);
}

// The stage copy a launch runs: the setting, but kStageRegisters (the same slices, the same
// bits) where it asks for the tagged exchange and the plan cannot take it
// (fused_rnn.h tagged_exchange: fp32, no staging, K parts, a DSMEM mirror).
int launch_stage_copy(int64_t stage_copy, const Plan& plan, c10::ScalarType st, int cluster_mode) {
  const int copy = checked_stage_copy(stage_copy);
  if (copy == fused_rnn::kStageTagged && !fused_rnn::tagged_exchange(plan, storage_of(st),
                                                                     cluster_mode))
    return fused_rnn::kStageRegisters;
  return copy;
}

// The exchange buffer (2, B_pad, k_pad), zeros but `first` (B, H) in the first rows and
// columns of buffer 0 where it is given (h0). Tagged (kStageTagged): int32 words, a value's
// 16 bits in the low half (`first` as its bits), buffer 0 under kFirstTag and buffer 1 all
// zeros, whose tag no step has (rnn_common.cuh exchange_tag); else in the storage type.
at::Tensor exchange_buffer(bool tagged, int64_t B_pad, int64_t k_pad,
                           const at::TensorOptions& storage, const at::Tensor& first) {
  if (!tagged) {
    at::Tensor buf = at::zeros({2, B_pad, k_pad}, storage);
    if (first.defined())
      buf[0].narrow(0, 0, first.size(0)).narrow(1, 0, first.size(1)).copy_(first);
    return buf;
  }
  at::Tensor buf = at::zeros({2, B_pad, k_pad}, storage.dtype(at::kInt));
  buf[0].fill_(static_cast<int64_t>(fused_rnn::kFirstTag));
  if (first.defined())
    buf[0].narrow(0, 0, first.size(0)).narrow(1, 0, first.size(1))
        .bitwise_or_(first.view(at::kShort).to(at::kInt).bitwise_and(0xFFFF));
  return buf;
}

// Rows [0, B) and columns [0, H) of exchange buffer i as a contiguous (B, H) tensor of `st`
// (h_n): a copy, so that it does not keep the whole buffer alive. Tagged, each word's low half
// (the first of its two int16 on a little-endian host and GPU), read as `st`.
at::Tensor exchange_values(const at::Tensor& buf, int64_t i, int64_t B, int64_t H, bool tagged,
                           c10::ScalarType st) {
  at::Tensor v = tagged ? buf[i].view(at::kShort).narrow(0, 0, B).slice(1, 0, 2 * H, 2).view(st)
                        : buf[i].narrow(0, 0, B).narrow(1, 0, H);
  return v.clone(at::MemoryFormat::Contiguous);
}

// The persistent launch's fields of FwdParams or BwdParams: the plan and the checked settings.
template <typename Params>
void set_launch(Params& p, const Plan& plan, int64_t batch_pad, long long* prof,
                int stage_copy, int64_t tile_block, int64_t point_batch, int64_t frag_loads,
                int cluster_mode, const at::Tensor& part) {
  p.plan = plan;
  p.batch_pad = static_cast<int>(batch_pad);
  p.prof = prof;
  p.stage_copy = stage_copy;  // checked: launch_stage_copy
  p.tile_block = checked_tile_block(tile_block);
  p.point_batch = checked_point_batch(point_batch);
  p.frag_loads = checked_frag_loads(frag_loads);
  p.cluster = cluster_mode;
  p.part = part.defined() ? part.data_ptr<float>() : nullptr;
}

// The sizes of a call (forward or backward, either path), read off its checked tensors.
struct Call {
  Cell cell;
  int64_t G, T, B, H;
  at::Device dev;
  c10::ScalarType st;
};

// A persistent launch's plan: the selection, the padded batch and the cluster mode.
struct Planned {
  fused_rnn::Selection sel;
  int64_t batch_pad;
  int cluster_mode;
};

Planned planned(const Call& c, bool allow_tf32, bool backward, int64_t max_groups,
                int64_t max_stage_k, int64_t k_parts, int64_t max_blocks, int64_t cluster,
                bool team_clusters, bool dsmem) {
  Planned p{};
  p.batch_pad = fused_rnn::round_up(static_cast<int>(c.B), fused_rnn::kBatchPad);
  p.cluster_mode = fused_rnn::kClusterNone;
  p.sel = checked_plan(c.cell, c.st, allow_tf32, c.H, backward, c.dev, p.batch_pad, max_groups,
                       max_stage_k, k_parts, max_blocks, cluster, team_clusters, dsmem,
                       &p.cluster_mode);
  return p;
}

// ---- what forward() and forward_steps() share ------------------------------------------------

// Checks a forward call's tensors (device, dtype, shape, contiguity) and sizes.
Call checked_forward(int64_t mode, const at::Tensor& xproj, const at::Tensor& h0,
                        const c10::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& b_hh,
                        const c10::optional<at::Tensor>& b_ih) {
  const Cell cell = cell_of(mode);
  const int64_t G = fused_rnn::gates_of(cell);
  TORCH_CHECK(xproj.is_cuda(), "fused_rnn CUDA backend: inputs must be CUDA tensors, got ",
              xproj.device());
  TORCH_CHECK(xproj.dim() == 3, "fused_rnn CUDA backend: xproj must be (T, B, G*H), got ",
              dims(xproj.sizes()));
  TORCH_CHECK(h0.dim() == 2, "fused_rnn CUDA backend: h0 must be (B, H), got ",
              dims(h0.sizes()));
  const int64_t T = xproj.size(0), B = xproj.size(1), H = h0.size(1);
  TORCH_CHECK(T > 0 && B > 0, "fused_rnn CUDA backend: empty chunks are handled in Python");
  check_counts(T, B);
  check_hidden(H);
  const at::Device dev = xproj.device();
  const c10::ScalarType st = h0.scalar_type();
  check_dtype(st);
  check(xproj, "xproj", dev, at::kFloat, {T, B, G * H});
  check(h0, "h0", dev, st, {B, H});
  check(w_hh, "w_hh", dev, st, {G * H, H});
  if (b_hh.has_value() && b_hh->defined()) check(*b_hh, "b_hh", dev, at::kFloat, {G * H});
  if (b_ih.has_value() && b_ih->defined()) check(*b_ih, "b_ih", dev, at::kFloat, {G * H});
  if (cell == Cell::kLSTM)
    check(required(c0, "c0", "for LSTM"), "c0", dev, st, {B, H});
  TORCH_CHECK(T * B * G * H < (int64_t(1) << 62), "fused_rnn CUDA backend: sizes too large");
  return {cell, G, T, B, H, dev, st};
}

// The forward outputs both paths allocate the same way, and the params that point at them and
// at the inputs (the caller sets the plan, the exchange buffer and the tuning fields).
struct FwdOutputs {
  at::Tensor cbuf, y, aux;
  bool has_aux;  // aux is (T, B, H), else empty
};

FwdOutputs forward_outputs(const Call& c, const at::Tensor& xproj, const at::Tensor& h0,
                           const c10::optional<at::Tensor>& c0, bool save) {
  FwdOutputs o;
  o.cbuf = c.cell == Cell::kLSTM ? c0->to(at::kFloat).contiguous().clone() : at::Tensor();
  o.y = at::empty({c.T, c.B, c.H}, h0.options());
  o.has_aux = save && (c.cell == Cell::kLSTM || c.cell == Cell::kGRU);
  o.aux = o.has_aux ? at::empty({c.T, c.B, c.H}, xproj.options())
                    : at::empty({0}, xproj.options());
  return o;
}

fused_rnn::FwdParams forward_params(const Call& c, at::Tensor& xproj, const at::Tensor& w_hh,
                                    const c10::optional<at::Tensor>& b_hh,
                                    const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& lengths, bool reverse,
                                    bool save, FwdOutputs& o, at::Tensor& hbuf) {
  fused_rnn::FwdParams p{};
  p.steps = static_cast<int>(c.T);
  p.batch = static_cast<int>(c.B);
  p.hidden = static_cast<int>(c.H);
  p.reverse = reverse;
  p.save = save;
  p.w_hh = w_hh.data_ptr();
  p.b_hh = (b_hh.has_value() && b_hh->defined()) ? b_hh->data_ptr<float>() : nullptr;
  p.b_ih = (b_ih.has_value() && b_ih->defined()) ? b_ih->data_ptr<float>() : nullptr;
  p.lengths = lengths_ptr(lengths, c.dev, c.B);
  p.xproj = xproj.data_ptr<float>();
  p.hbuf = hbuf.data_ptr();
  p.cbuf = o.cbuf.defined() ? o.cbuf.data_ptr<float>() : nullptr;
  p.y = o.y.data_ptr();
  p.aux = o.has_aux ? o.aux.data_ptr<float>() : nullptr;
  return p;
}

// ---- what backward() and backward_steps() share ----------------------------------------------

Call checked_backward(int64_t mode, const at::Tensor& dy, const at::Tensor& dh_n,
                         const c10::optional<at::Tensor>& dc_n, const at::Tensor& w_hh,
                         const at::Tensor& gates, const c10::optional<at::Tensor>& aux,
                         const c10::optional<at::Tensor>& c0,
                         const c10::optional<at::Tensor>& hprev) {
  const Cell cell = cell_of(mode);
  const int64_t G = fused_rnn::gates_of(cell);
  TORCH_CHECK(dy.is_cuda(), "fused_rnn CUDA backend: inputs must be CUDA tensors, got ",
              dy.device());
  TORCH_CHECK(dy.dim() == 3, "fused_rnn CUDA backend: dy must be (T, B, H), got ",
              dims(dy.sizes()));
  const int64_t T = dy.size(0), B = dy.size(1), H = dy.size(2);
  TORCH_CHECK(T > 0 && B > 0, "fused_rnn CUDA backend: empty chunks are handled in Python");
  check_counts(T, B);
  check_hidden(H);
  const at::Device dev = dy.device();
  const c10::ScalarType st = dy.scalar_type();
  check_dtype(st);
  check(dy, "dy", dev, st, {T, B, H});  // the kernels read it as dense (T, B, H)
  check(dh_n, "dh_n", dev, at::kFloat, {B, H});
  check(w_hh, "w_hh", dev, st, {G * H, H});
  check(gates, "gates", dev, at::kFloat, {T, B, G * H});
  // After gates' check: T * B * G * H is then the numel of a tensor, so it cannot overflow.
  TORCH_CHECK(T * B * G * H < (int64_t(1) << 62), "fused_rnn CUDA backend: sizes too large");
  if (cell == Cell::kLSTM) {
    check(required(dc_n, "dc_n", "for LSTM"), "dc_n", dev, at::kFloat, {B, H});
    check(required(c0, "c0", "for LSTM"), "c0", dev, at::kFloat, {B, H});
  }
  if (cell == Cell::kLSTM || cell == Cell::kGRU)
    check(required(aux, "aux", "for LSTM and GRU (forward with save=True)"), "aux", dev,
          at::kFloat, {T, B, H});
  if (cell == Cell::kGRU) check(required(hprev, "hprev", "for GRU"), "hprev", dev, st, {T, B, H});
  return {cell, G, T, B, H, dev, st};
}

struct BwdOutputs {
  at::Tensor dh_carry, dc_carry, dgx, dghn, dh0;
};

BwdOutputs backward_outputs(const Call& c, const at::Tensor& dy, const at::Tensor& dh_n,
                            const c10::optional<at::Tensor>& dc_n) {
  BwdOutputs o;
  o.dh_carry = dh_n.clone();
  o.dc_carry = c.cell == Cell::kLSTM ? dc_n->clone() : at::empty({0}, dh_n.options());
  o.dgx = at::empty({c.T, c.B, c.G * c.H}, dy.options());
  o.dghn = c.cell == Cell::kGRU ? at::empty({c.T, c.B, c.H}, dy.options())
                                : at::empty({0}, dy.options());
  o.dh0 = at::empty({c.B, c.H}, dh_n.options());
  return o;
}

fused_rnn::BwdParams backward_params(const Call& c, const at::Tensor& dy,
                                     const at::Tensor& w_hh, const at::Tensor& gates,
                                     const c10::optional<at::Tensor>& aux,
                                     const c10::optional<at::Tensor>& c0,
                                     const c10::optional<at::Tensor>& hprev,
                                     const c10::optional<at::Tensor>& lengths, bool reverse,
                                     BwdOutputs& o, at::Tensor& dgbuf) {
  const bool lstm = c.cell == Cell::kLSTM, gru = c.cell == Cell::kGRU;
  fused_rnn::BwdParams p{};
  p.steps = static_cast<int>(c.T);
  p.batch = static_cast<int>(c.B);
  p.hidden = static_cast<int>(c.H);
  p.reverse = reverse;
  p.w_hh = w_hh.data_ptr();
  p.lengths = lengths_ptr(lengths, c.dev, c.B);
  p.dy = dy.data_ptr();
  p.gates = gates.data_ptr<float>();
  p.aux = (lstm || gru) ? aux->data_ptr<float>() : nullptr;
  p.c0 = lstm ? c0->data_ptr<float>() : nullptr;
  p.hprev = gru ? hprev->data_ptr() : nullptr;
  p.dgbuf = dgbuf.data_ptr();
  p.dh_carry = o.dh_carry.data_ptr<float>();
  p.dc_carry = lstm ? o.dc_carry.data_ptr<float>() : nullptr;
  p.dgx = o.dgx.data_ptr();
  p.dghn = gru ? o.dghn.data_ptr() : nullptr;
  p.dh0 = o.dh0.data_ptr<float>();
  return p;
}

// Forward over a chunk. xproj (T, B, G*H) fp32 = x W_ih^T + b_ih (or x W_ih^T alone, with b_ih
// (G*H,) fp32 given: the kernel adds it), overwritten with the activations when `save`. Returns
// {y (T,B,H), h_n (B,H), c_n (B,H) or empty, aux (T,B,H) fp32 or empty} (aux: LSTM c_t, GRU
// W_hn h + b_hn; only when save).
std::vector<at::Tensor> forward(int64_t mode, at::Tensor xproj, at::Tensor h0,
                                c10::optional<at::Tensor> c0, at::Tensor w_hh,
                                c10::optional<at::Tensor> b_hh,
                                c10::optional<at::Tensor> lengths, bool reverse, bool allow_tf32,
                                bool save, int64_t max_groups, int64_t max_stage_k,
                                c10::optional<at::Tensor> prof, int64_t stage_copy,
                                int64_t k_parts, int64_t max_blocks, int64_t cluster,
                                bool team_clusters, bool dsmem, int64_t tile_block,
                                int64_t point_batch, c10::optional<at::Tensor> b_ih,
                                int64_t frag_loads) {
  const Call c = checked_forward(mode, xproj, h0, c0, w_hh, b_hh, b_ih);
  const c10::cuda::CUDAGuard guard(c.dev);
  const Planned pl = planned(c, allow_tf32, /*backward=*/false, max_groups, max_stage_k, k_parts,
                             max_blocks, cluster, team_clusters, dsmem);
  const fused_rnn::Selection& sel = pl.sel;
  const Plan& plan = sel.plan;
  const int64_t B_pad = pl.batch_pad;
  const int cluster_mode = pl.cluster_mode;
  const int copy = launch_stage_copy(stage_copy, plan, c.st, cluster_mode);
  const bool tagged = copy == fused_rnn::kStageTagged;
  at::Tensor hbuf = exchange_buffer(tagged, B_pad, plan.k_pad, h0.options(), h0);
  FwdOutputs o = forward_outputs(c, xproj, h0, c0, save);
  fused_rnn::FwdParams p =
      forward_params(c, xproj, w_hh, b_hh, b_ih, lengths, reverse, save, o, hbuf);
  const at::Tensor part = part_buffer(plan, B_pad, xproj.options());
  set_launch(p, plan, B_pad, prof_ptr(prof, c.dev, plan), copy, tile_block, point_batch,
             frag_loads, cluster_mode, part);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.dev.index()).stream();
  const auto launch = [&](auto cl, auto tag, auto m) {
    using T_ = typename decltype(tag)::type;
    return fused_rnn::launch_forward<decltype(cl)::value, T_, decltype(m)::value>(p, stream);
  };
  FRNN_CHECK_CUDA(fused_rnn::dispatch(c.cell, storage_of(c.st), sel.math, launch));
  // A copy: where B and H fill the padded buffer the slice is contiguous already, and
  // .contiguous() would return it, keeping all of hbuf alive with the state.
  at::Tensor h_n = exchange_values(hbuf, c.T % 2, c.B, c.H, tagged, c.st);
  at::Tensor c_n = c.cell == Cell::kLSTM ? o.cbuf.to(c.st) : at::empty({0}, h0.options());
  return {o.y, h_n, c_n, o.aux};
}

// Backward over a chunk (see rnn_backward.cu). dy (T,B,H) storage; dh_n, dc_n (B,H) fp32;
// gates (T,B,G*H) and aux (T,B,H) fp32 from forward(save=true); c0 (B,H) fp32 (LSTM); hprev
// (T,B,H) storage (GRU). Returns {dgx (T,B,G*H) and dghn (T,B,H) (GRU, else empty) in the
// storage type, dh0, dc0 (B,H) fp32; dc0 empty unless LSTM}.
std::vector<at::Tensor> backward(int64_t mode, at::Tensor dy, at::Tensor dh_n,
                                 c10::optional<at::Tensor> dc_n, at::Tensor w_hh,
                                 at::Tensor gates, c10::optional<at::Tensor> aux,
                                 c10::optional<at::Tensor> c0, c10::optional<at::Tensor> hprev,
                                 c10::optional<at::Tensor> lengths, bool reverse,
                                 bool allow_tf32, int64_t max_groups, int64_t max_stage_k,
                                 c10::optional<at::Tensor> prof, int64_t stage_copy,
                                 int64_t k_parts, int64_t max_blocks, int64_t cluster,
                                 bool team_clusters, bool dsmem, int64_t tile_block,
                                 int64_t point_batch, int64_t frag_loads) {
  const Call c = checked_backward(mode, dy, dh_n, dc_n, w_hh, gates, aux, c0, hprev);
  const c10::cuda::CUDAGuard guard(c.dev);
  const Planned pl = planned(c, allow_tf32, /*backward=*/true, max_groups, max_stage_k, k_parts,
                             max_blocks, cluster, team_clusters, dsmem);
  const fused_rnn::Selection& sel = pl.sel;
  const Plan& plan = sel.plan;
  const int64_t B_pad = pl.batch_pad;
  const int cluster_mode = pl.cluster_mode;
  const int copy = launch_stage_copy(stage_copy, plan, c.st, cluster_mode);
  at::Tensor dgbuf = exchange_buffer(copy == fused_rnn::kStageTagged, B_pad, plan.k_pad,
                                     dy.options(), at::Tensor());
  BwdOutputs o = backward_outputs(c, dy, dh_n, dc_n);
  fused_rnn::BwdParams p =
      backward_params(c, dy, w_hh, gates, aux, c0, hprev, lengths, reverse, o, dgbuf);
  const at::Tensor part = part_buffer(plan, B_pad, gates.options());
  set_launch(p, plan, B_pad, prof_ptr(prof, c.dev, plan), copy, tile_block, point_batch,
             frag_loads, cluster_mode, part);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.dev.index()).stream();
  const auto launch = [&](auto cl, auto tag, auto m) {
    using T_ = typename decltype(tag)::type;
    return fused_rnn::launch_backward<decltype(cl)::value, T_, decltype(m)::value>(p, stream);
  };
  FRNN_CHECK_CUDA(fused_rnn::dispatch(c.cell, storage_of(c.st), sel.math, launch));
  return {o.dgx, o.dghn, o.dh0, o.dc_carry};
}

// ---- the per-step path (fused_rnn.h StepArgs) ---------------------------------------------
// Each step: the recurrent matmul as one GEMM through torch (cuBLAS) with an fp32 result, then
// one launch of the step's points. 16-bit operands go to cuBLAS as they are (aten::mm.dtype);
// fp32 ones run as torch's fp32 GEMMs are set to (TF32 or not: ops.py sets it for the call).
// Where torch refuses the 16-bit GEMM (as common.mm_f32 allows for: some cuBLAS paths refuse
// some layouts), the operands are promoted to fp32 instead, with a warning once: the same
// exact products, summed in fp32, more slowly. Running out of memory is not a refusal: it
// propagates. (A device fault, torch >= 2.8's AcceleratorError, is met again by the retry.) Everything is queued on the current stream, so a
// CUDA graph can capture the whole loop.
// A template so that the branch a torch's headers cannot compile is discarded: aten::mm's
// out_dtype overload is new in torch 2.8, and before it every 16-bit step GEMM is promoted.
template <class Tensor>
void step_mm(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
    return;
  }
  if constexpr (requires { at::mm_out(out, a, b, at::kFloat); }) {
    try {
      at::mm_out(out, a, b, at::kFloat);
    } catch (const c10::OutOfMemoryError&) {
      throw;  // not a refusal: the promoted retry would need more memory still
    } catch (const c10::Error& e) {
      TORCH_WARN_ONCE("fused_rnn CUDA backend: torch refused the per-step path's 16-bit GEMM (",
                      e.what_without_backtrace(), "); its steps run on operands promoted to "
                      "fp32 instead, the same products, more slowly");
      at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
    }
  } else {
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  }
}

// Forward over a chunk by steps: forward()'s arguments and results, without the tuning ones
// (there is no plan). The exchange buffer is (2, B, H), no padding rows.
std::vector<at::Tensor> forward_steps(int64_t mode, at::Tensor xproj, at::Tensor h0,
                                      c10::optional<at::Tensor> c0, at::Tensor w_hh,
                                      c10::optional<at::Tensor> b_hh,
                                      c10::optional<at::Tensor> lengths, bool reverse, bool save,
                                      c10::optional<at::Tensor> b_ih) {
  const Call c = checked_forward(mode, xproj, h0, c0, w_hh, b_hh, b_ih);
  const c10::cuda::CUDAGuard guard(c.dev);
  at::Tensor hbuf = at::empty({2, c.B, c.H}, h0.options());
  hbuf[0].copy_(h0);
  FwdOutputs o = forward_outputs(c, xproj, h0, c0, save);
  fused_rnn::FwdParams p =
      forward_params(c, xproj, w_hh, b_hh, b_ih, lengths, reverse, save, o, hbuf);
  p.batch_pad = static_cast<int>(c.B);
  at::Tensor rec = at::empty({c.B, c.G * c.H}, xproj.options());
  // The loop's views made once: each is a dispatcher call, and the host's time per step is
  // what the GPU waits for at small batches.
  const at::Tensor wt = w_hh.t(), h_in[2] = {hbuf[0], hbuf[1]};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.dev.index()).stream();
  for (int64_t s = 0; s < c.T; ++s) {
    step_mm(rec, h_in[s % 2], wt);
    const auto launch = [&](auto cl, auto tag) {
      using T_ = typename decltype(tag)::type;
      return fused_rnn::launch_forward_step<decltype(cl)::value, T_>(
          p, rec.data_ptr<float>(), static_cast<int>(s), stream);
    };
    FRNN_CHECK_CUDA(fused_rnn::dispatch_step(c.cell, storage_of(c.st), launch));
  }
  at::Tensor h_n = hbuf[c.T % 2].clone();
  at::Tensor c_n = c.cell == Cell::kLSTM ? o.cbuf.to(c.st) : at::empty({0}, h0.options());
  return {o.y, h_n, c_n, o.aux};
}

// Backward over a chunk by steps: backward()'s arguments and results, without the tuning ones.
// The exchange buffer is (2, B, G*H); iteration 0's matmul output is zeros (nothing reaches h
// through W_hh yet), so it runs no GEMM.
std::vector<at::Tensor> backward_steps(int64_t mode, at::Tensor dy, at::Tensor dh_n,
                                       c10::optional<at::Tensor> dc_n, at::Tensor w_hh,
                                       at::Tensor gates, c10::optional<at::Tensor> aux,
                                       c10::optional<at::Tensor> c0,
                                       c10::optional<at::Tensor> hprev,
                                       c10::optional<at::Tensor> lengths, bool reverse) {
  const Call c = checked_backward(mode, dy, dh_n, dc_n, w_hh, gates, aux, c0, hprev);
  const c10::cuda::CUDAGuard guard(c.dev);
  at::Tensor dgbuf = at::zeros({2, c.B, c.G * c.H}, dy.options());
  BwdOutputs o = backward_outputs(c, dy, dh_n, dc_n);
  fused_rnn::BwdParams p =
      backward_params(c, dy, w_hh, gates, aux, c0, hprev, lengths, reverse, o, dgbuf);
  p.batch_pad = static_cast<int>(c.B);
  at::Tensor rec = at::zeros({c.B, c.H}, dh_n.options());
  const at::Tensor dg_in[2] = {dgbuf[0], dgbuf[1]};  // made once, as forward_steps' views
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.dev.index()).stream();
  for (int64_t s = 0; s <= c.T; ++s) {
    if (s > 0) step_mm(rec, dg_in[s % 2], w_hh);
    const auto launch = [&](auto cl, auto tag) {
      using T_ = typename decltype(tag)::type;
      return fused_rnn::launch_backward_step<decltype(cl)::value, T_>(
          p, rec.data_ptr<float>(), static_cast<int>(s), stream);
    };
    FRNN_CHECK_CUDA(fused_rnn::dispatch_step(c.cell, storage_of(c.st), launch));
  }
  return {o.dgx, o.dghn, o.dh0, o.dc_carry};
}

// The plan for (mode, math code, H, direction) with `max_blocks` blocks: lets tests compare
// this C++ arithmetic with the Python mirror (fused_rnn/ops/cuda/plan.py).
std::vector<int64_t> plan_info(int64_t mode, int64_t math, int64_t hidden, bool backward,
                               int64_t max_blocks, int64_t groups, int64_t stage_rows,
                               int64_t stage_k, int64_t parts) {
  TORCH_CHECK(math >= 0 && math <= 2, "fused_rnn CUDA backend: math code must be 0, 1 or 2");
  check_hidden(hidden);
  TORCH_CHECK(max_blocks >= 1 && max_blocks <= (1 << 16),
              "fused_rnn CUDA backend: bad max_blocks ", num(max_blocks));
  TORCH_CHECK(groups >= 1 && groups <= max_blocks, "fused_rnn CUDA backend: bad groups");
  TORCH_CHECK(parts >= 1 && parts <= max_blocks, "fused_rnn CUDA backend: bad parts");
  TORCH_CHECK(stage_rows >= 0 && stage_rows <= kMaxRows && stage_k >= 0 && stage_k <= (1 << 30),
              "fused_rnn CUDA backend: bad staging");
  const Plan p = fused_rnn::make_plan(cell_of(mode), static_cast<Math>(math),
                                      static_cast<int>(hidden), backward,
                                      static_cast<int>(max_blocks), static_cast<int>(groups),
                                      static_cast<int>(stage_rows), static_cast<int>(stage_k),
                                      static_cast<int>(parts));
  return {p.units, p.blocks, p.m_rows, p.m_pad, p.k, p.k_pad, p.ldw, p.slots, p.slot_floats,
          p.w_bytes, p.smem_bytes, p.groups, p.group_blocks, p.stage_rows, p.stage_k,
          p.stage_ld, p.parts, p.k_part, p.part_ld};
}

// (SM count, opt-in shared memory per block in bytes, major, minor, cooperative launch) of a
// device: what unsupported_reason sizes plans against.
std::vector<int64_t> device_info(int64_t index) {
  TORCH_CHECK(index >= 0 && index < c10::cuda::device_count(),
              "fused_rnn CUDA backend: no CUDA device ", num(index));
  const DeviceInfo d = device_attributes(static_cast<int>(index));
  return {d.sms, d.smem_optin, d.major, d.minor, d.cooperative};
}

// (0, binary version, PTX version) where the build has code device `index` can run, else
// (the CUDA error code, 0, 0): fused_rnn.h kernel_image, on that device.
std::vector<int64_t> kernel_image(int64_t index) {
  TORCH_CHECK(index >= 0 && index < c10::cuda::device_count(),
              "fused_rnn CUDA backend: no CUDA device ", num(index));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
  int binary = 0, ptx = 0;
  const cudaError_t err = fused_rnn::kernel_image(&binary, &ptx);
  return {static_cast<int64_t>(err), binary, ptx};
}

}  // namespace

// The digest of csrc/ this was built from (fused_rnn/ops/cuda/buildinfo.py source_hash, passed
// by both builds as -DFRNN_SOURCE_HASH=h...): the loader refuses a build from other sources.
#ifndef FRNN_SOURCE_HASH
#define FRNN_SOURCE_HASH unknown
#endif
#define FRNN_STR2(x) #x
#define FRNN_STR(x) FRNN_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn persistent CUDA kernels (see csrc/)";
  m.attr("source_hash") = FRNN_STR(FRNN_SOURCE_HASH);
  // The torch release whose headers this was compiled against: the loader refuses a prebuilt
  // build for another one (torch's C++ ABI changes between releases).
  m.attr("torch_version") =
      py::make_tuple(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  m.def("forward", &forward, "persistent forward over a chunk", py::arg("mode"), py::arg("xproj"),
        py::arg("h0"), py::arg("c0"), py::arg("w_hh"), py::arg("b_hh"), py::arg("lengths"),
        py::arg("reverse"), py::arg("allow_tf32"), py::arg("save"), py::arg("max_groups"),
        py::arg("max_stage_k"), py::arg("prof") = py::none(), py::arg("stage_copy") = 2,
        py::arg("k_parts") = 1, py::arg("max_blocks") = 0, py::arg("cluster") = 0,
        py::arg("team_clusters") = false, py::arg("dsmem") = false, py::arg("tile_block") = 4,
        py::arg("point_batch") = 0, py::arg("b_ih") = py::none(), py::arg("frag_loads") = 0);
  m.def("backward", &backward, "persistent backward over a chunk", py::arg("mode"),
        py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("w_hh"), py::arg("gates"),
        py::arg("aux"), py::arg("c0"), py::arg("hprev"), py::arg("lengths"), py::arg("reverse"),
        py::arg("allow_tf32"), py::arg("max_groups"), py::arg("max_stage_k"),
        py::arg("prof") = py::none(), py::arg("stage_copy") = 2, py::arg("k_parts") = 1,
        py::arg("max_blocks") = 0, py::arg("cluster") = 0, py::arg("team_clusters") = false,
        py::arg("dsmem") = false, py::arg("tile_block") = 4, py::arg("point_batch") = 0,
        py::arg("frag_loads") = 0);
  // The step entry points may TORCH_WARN (step_mm): torch's wrapper hands that to Python's
  // warnings (a plain pybind11 function prints it to stderr), and unlike a bare
  // PyWarningHandler guard it knows when an error is on its way out too.
  m.def("forward_steps", torch::wrap_pybind_function(forward_steps),
        "forward over a chunk by steps (a GEMM, a launch each)", py::arg("mode"), py::arg("xproj"), py::arg("h0"), py::arg("c0"), py::arg("w_hh"),
        py::arg("b_hh"), py::arg("lengths"), py::arg("reverse"), py::arg("save"),
        py::arg("b_ih") = py::none());
  m.def("backward_steps", torch::wrap_pybind_function(backward_steps),
        "backward over a chunk by steps", py::arg("mode"),
        py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("w_hh"), py::arg("gates"),
        py::arg("aux"), py::arg("c0"), py::arg("hprev"), py::arg("lengths"), py::arg("reverse"));
  m.def("plan_info", &plan_info, "launch plan (units, blocks, ..., parts, k_part, part_ld)",
        py::arg("mode"), py::arg("math"), py::arg("hidden"), py::arg("backward"),
        py::arg("max_blocks"), py::arg("groups") = 1, py::arg("stage_rows") = 0,
        py::arg("stage_k") = 0, py::arg("parts") = 1);
  m.def("device_info", &device_info, "(num_sms, smem_optin, major, minor, cooperative)");
  m.def("kernel_image", &kernel_image,
        "(cuda error code, binary version, ptx version) of the code device `index` would run");
  m.def("cluster_launches", [] { return fused_rnn::cluster_launches; },
        "launches so far that ran as clusters (cluster mode, not its cooperative fallback)");
}
