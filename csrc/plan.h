// How a persistent RNN launch is partitioned: units per block, blocks, shared-memory layout.
//
// Pure C++ with no includes, so that nvcc (kernels), the C++ binding and a plain g++ test
// harness (tests/cuda/test_cuda_compile.py) all compile the same arithmetic. The Python
// mirror in fused_rnn/ops/cuda/plan.py must agree with it; that test checks they do.
//
// Partition (both directions of the recurrence):
//   * a block owns `units` consecutive hidden units u0 .. u0+units-1 (all gates of each), so the
//     gate math, the cell state and the per-unit backward carries never leave the block;
//   * forward: the block's shared memory holds the rows of W_hh of its units, gate-major
//     (local row g*units + j <-> W_hh row g*H + u0 + j), all H columns: M = G*units, K = H;
//   * backward: it holds the columns of W_hh of its units, transposed (local row j <-> column
//     u0 + j), all G*H rows: M = units, K = G*H;
//   * each step computes out[M][batch] = W_slice (M x K, shared memory) * X^T where X (batch x K,
//     the exchange buffer in global memory/L2: h_{t-1} forward, dgates backward) is read by every
//     block. The batch is processed in chunks of kChunkCols columns; the matmul of one chunk is
//     split into `tasks` output tiles (wm x wn) and, when there are fewer tiles than warps, split
//     along K as well so that every warp has work. Each (tile, K-slice) writes its own fp32 slot
//     in shared memory and the epilogue sums the slots in a fixed order (deterministic).
//
// Batch groups: every block reads the whole exchange buffer of its batch rows every step
// (B x H forward, B x G*H backward), so at large B that all-gather from L2, not the grid sync,
// bounds a step. With `groups` = g > 1 the grid is g groups of `group_blocks` blocks; group q
// serves batch rows [q * B_pad/g, (q+1) * B_pad/g) and each of its blocks owns g times more
// units (its W slice is g times larger). Per step every block then reads 1/g of the exchange
// buffer; the matmul work per block is unchanged. choose_groups takes the largest g that fits;
// select_plan takes fewer where that leaves no room for a stage of X.
#pragma once

#if defined(__CUDACC__)
#define FRNN_HD __host__ __device__
#else
#define FRNN_HD
#endif

namespace fused_rnn {

enum class Cell : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

// How the recurrent matmul is computed.
//   kWmma16: bf16/fp16 operands on tensor cores, WMMA m8n32k16 (M = W rows, N = batch), fp32 acc.
//            m8 (not m16) halves the padding of small per-block row counts (backward M = units).
//   kTf32:   fp32 storage, operands rounded to TF32 on tensor cores, WMMA m16n16k8, fp32 acc;
//            used only when torch.backends.cudnn.allow_tf32 is true (what nn.LSTM does) and
//            its plan fits (choose_math).
//   kFma:    fp32 storage, plain fp32 FMA (8 x 32 tiles: one W row, 8 batch columns a thread).
enum class Math : int { kWmma16 = 0, kTf32 = 1, kFma = 2 };

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchPad = 32;    // exchange-buffer rows (batch) are padded to this (max wn)
constexpr int kKPad = 16;        // exchange-buffer columns (K) are padded to this (max wk)
constexpr int kChunkCols = 64;   // batch columns per matmul+epilogue chunk (bounds scratch smem)
constexpr int kSlotPad = 4;      // fp32 row padding of a scratch slot (bank spread, 16 B aligned)
constexpr int kMinStageK = 64;   // a smaller stage slice is not worth its barriers (see Plan)
constexpr int kMinPartK = 64;    // K columns per part below which K parts are not considered
// The fixed cost of K parts, in bytes of exchange reads per block (choose_parts): one more
// grid.sync() (1.1 us on an H100, ANCHORS.md) and the dependent L2 round trip of the partial
// sums after it, about 2 us in all, at roughly 60 GB/s of L2 reads per SM with every SM reading.
constexpr int kPartFixedBytes = 128 * 1024;

FRNN_HD constexpr int gates_of(Cell c) {
  return c == Cell::kLSTM ? 4 : (c == Cell::kGRU ? 3 : 1);
}
FRNN_HD constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
FRNN_HD constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }
FRNN_HD constexpr int imax(int a, int b) { return a > b ? a : b; }
FRNN_HD constexpr int imin(int a, int b) { return a < b ? a : b; }
FRNN_HD constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }
// A byte count as the plans compare it with smem_limit: computed in 64 bits, rounded up to 128
// and saturated at the largest int, so a size too large for an int never wraps into one that
// seems to fit (a DSMEM mirror at a batch of ~5e5 rows once wrapped to a size that passed).
constexpr long long kMaxBytes = 0x7fffffff;
FRNN_HD constexpr int saturated(long long bytes) {
  return static_cast<int>(bytes > kMaxBytes ? kMaxBytes : bytes);
}
FRNN_HD constexpr int bytes_128(long long bytes) { return saturated((bytes + 127) / 128 * 128); }

struct TileShape {
  int wm;          // output rows (W rows) per tile
  int wn;          // output columns (batch) per tile
  int wk;          // K per MMA / FMA step
  int elem_bytes;  // bytes per W element in shared memory
  int w_skew;      // extra elements per W row in shared memory (bank spread; keeps alignment)
  int row_granule; // W-slice rows held in shared memory are padded to a multiple of this
};

// The W slice's layout in shared memory (element (r, k) of the M x K slice):
//   row-major (kWmma16, kFma): r * ldw + k, ldw = K_pad + w_skew;
//   k-blocked (kTf32):         (k / wk) * ldw + r * wk + k % wk, ldw = m_pad * wk: one
//     contiguous m_pad x 8 row-major block per 8-wide k-step. A 16-row TF32 fragment of block
//     kk is then 16 consecutive 8-float rows (ldm 8), so m_pad only needs to be a multiple of
//     8: where it is not a multiple of 16, the last tile's rows m_pad .. m_pad+7 are the first
//     rows of block kk+1 (after the last block, a zeroed tail). A row of A only reaches the same
//     row of the output, and output rows >= m_rows are never read, so these rows change nothing.
//     (Row-major TF32 had to pad the slice to 16 rows: at H = 1024 the LSTM backward slice,
//     8 rows x 4096, then did not fit and fp32 fell back to FMA, ~7x less arithmetic rate.)
FRNN_HD constexpr bool k_blocked(Math m) { return m == Math::kTf32; }

FRNN_HD constexpr TileShape tile_shape(Math m) {
  // Alignment: WMMA pointers must be 32-byte aligned and ldm a multiple of 16 bytes. With
  // K padded to 16, the skews below and 8-row TF32 blocks every fragment origin used by the
  // kernels is aligned. FMA: 16-byte loads of 8 W rows at once; a row stride of 4 or 20 mod 32
  // floats (K_pad + 4) puts them in distinct banks.
  return m == Math::kWmma16 ? TileShape{8, 32, 16, 2, 8, 8}
       : m == Math::kTf32   ? TileShape{16, 16, 8, 4, 0, 8}
                            : TileShape{8, 32, 4, 4, 4, 1};
}

struct Plan {
  int units;        // hidden units per block (the last block may own fewer)
  int blocks;       // grid size = groups * group_blocks; all co-resident (cooperative launch)
  int m_rows;       // W-slice rows used: parts * (G*units (forward) or units (backward))
  int m_pad;        // rows held in shared memory (m_rows padded to the row granule)
  int k;            // reduction length: H (forward) or G*H (backward)
  int k_pad;        // k padded to kKPad: row stride of the exchange buffer
  int ldw;          // W slice, in elements: row stride (row-major) or k-block stride (kTf32)
  int slots;        // fp32 scratch slots (one per (tile, K-slice) of a chunk)
  int slot_floats;  // floats per slot: wm * (wn + kSlotPad)
  int w_bytes;      // shared memory for the W slice (rounded to 128 bytes)
  int smem_bytes;   // total dynamic shared memory per block
  int groups;       // batch groups (block b serves group b / group_blocks)
  int group_blocks; // blocks per group = ceil(H / units)
  // Staging: each chunk's X is copied from global memory/L2 into shared memory, K-slice by
  // K-slice of stage_k columns, by all threads at once (many loads in flight) before the MMAs
  // read it, instead of every warp reading its operand from L2 one k-step after another.
  // stage_k = 0: no staging (the MMAs read X from global memory directly).
  int stage_rows;   // rows of the stage buffer (the most batch columns of a chunk)
  int stage_k;      // K columns per slice (a multiple of kKPad), 0 = off
  int stage_ld;     // row stride of the stage buffer in elements (16 bytes of skew)
  // K parts (choose_parts, team_units); parts = 1: none (k_part = k_pad, part_ld = 0).
  int parts;        // blocks per team; divides group_blocks
  int k_part;       // K columns per team rank (a multiple of kKPad); rank r: [r*k_part, ...)
  int part_ld;      // floats per batch row of the partial buffer: (group_blocks/parts)*m_rows
};

// Team rows: forward local row r = g * team_units + jt <-> W_hh row g*H + team_u0 + jt;
// backward r = jt <-> column team_u0 + jt (team_units = parts*units, jt < team_units).
FRNN_HD constexpr int team_units(const Plan& p) { return p.parts * p.units; }

// units: at least ceil(H / max_blocks) so the grid fits in max_blocks (one block per SM: the
// slices are large), rounded up so that the forward slice rows G*units need no padding rows.
FRNN_HD constexpr int plan_units(Cell cell, Math math, int hidden, int max_blocks) {
  const int g = gates_of(cell);
  const TileShape ts = tile_shape(math);
  const int granule = ts.row_granule / gcd(ts.row_granule, g);
  const int u = round_up(imax(ceil_div(hidden, max_blocks), 1), granule);
  return imin(u, round_up(hidden, granule));
}

// groups must divide B_pad / kBatchPad (choose_groups) and be at most max_blocks; stage_rows
// and stage_k come from choose_stage_k (0, 0: no staging); parts must divide group_blocks and
// leave every rank some K (choose_parts).
FRNN_HD constexpr Plan make_plan(Cell cell, Math math, int hidden, bool backward,
                                 int max_blocks, int groups = 1, int stage_rows = 0,
                                 int stage_k = 0, int parts = 1) {
  const int g = gates_of(cell);
  const TileShape ts = tile_shape(math);
  const int units = plan_units(cell, math, hidden, imax(max_blocks / groups, 1));
  const int group_blocks = ceil_div(hidden, units);
  const int blocks = groups * group_blocks;
  const int m_rows = parts * (backward ? units : g * units);
  const int m_pad = round_up(m_rows, ts.row_granule);
  const int k = backward ? g * hidden : hidden;
  const int k_pad = round_up(k, kKPad);
  const int k_part = parts > 1 ? round_up(ceil_div(k_pad, parts), kKPad) : k_pad;
  const int ldw = k_blocked(math) ? m_pad * ts.wk : k_part + ts.w_skew;
  // k-blocked: the last block's tiles read round_up(m_pad, wm) - m_pad rows past it (the tail).
  const long long w_elems = k_blocked(math) ? static_cast<long long>(m_pad) * k_part +
                                                  (round_up(m_pad, ts.wm) - m_pad) * ts.wk
                                            : static_cast<long long>(m_pad) * ldw;
  const int w_bytes = bytes_128(w_elems * ts.elem_bytes);
  const int tasks = ceil_div(m_pad, ts.wm) * (kChunkCols / ts.wn);
  const int slots = imax(tasks, kWarps);
  const int slot_floats = ts.wm * (ts.wn + kSlotPad);
  const int stage_ld = stage_k > 0 ? stage_k + 16 / ts.elem_bytes : 0;
  const int stage_bytes =
      stage_k > 0 ? bytes_128(static_cast<long long>(stage_rows) * stage_ld * ts.elem_bytes) : 0;
  const int smem = saturated(static_cast<long long>(w_bytes) +
                             static_cast<long long>(slots) * slot_floats * 4 + stage_bytes);
  return Plan{units, blocks, m_rows, m_pad, k, k_pad, ldw, slots, slot_floats, w_bytes,
              smem, groups, group_blocks, stage_k > 0 ? stage_rows : 0, stage_k, stage_ld,
              parts, k_part, parts > 1 ? group_blocks / parts * m_rows : 0};
}

// The math a kernel uses. TF32 is a permission (torch.backends.cudnn.allow_tf32), not a
// requirement: where the TF32 plan would not fit in shared memory (its W slice has up to 7 more
// rows than the FMA one, its scratch slots are larger), the plain fp32 FMA kernel runs instead.
// Forward and backward choose independently.
FRNN_HD constexpr Math choose_math(bool is_16bit, bool allow_tf32, Cell cell, int hidden,
                                   bool backward, int max_blocks, int smem_limit) {
  if (is_16bit) return Math::kWmma16;
  if (allow_tf32 &&
      make_plan(cell, Math::kTf32, hidden, backward, max_blocks).smem_bytes <= smem_limit)
    return Math::kTf32;
  return Math::kFma;
}

// The number of batch groups: the largest g <= max_groups that divides B_pad / kBatchPad (every
// group a whole number of 32-row tiles, each with at least one real row), leaves every group at
// least one block per unit slice within max_blocks, and whose plan fits in smem_limit.
FRNN_HD constexpr int choose_groups(Cell cell, Math math, int hidden, bool backward,
                                    int max_blocks, int smem_limit, int batch_pad,
                                    int max_groups) {
  const int tiles = batch_pad / kBatchPad;
  int best = 1;
  for (int g = 2; g <= imin(max_groups, tiles) && g <= max_blocks; ++g) {
    if (tiles % g != 0) continue;
    const Plan p = make_plan(cell, math, hidden, backward, max_blocks, g);
    if (p.smem_bytes <= smem_limit && p.blocks <= max_blocks) best = g;
  }
  return best;
}

// Bytes one block moves per step for the recurrent matmul's input, by plan.h's model: the
// exchange-buffer columns it reads for `rows` batch rows, plus with K parts the partial sums
// it writes and reads (fp32, all team rows) and kPartFixedBytes for the extra grid sync.
FRNN_HD constexpr long long step_bytes(const Plan& p, Math math, int rows) {
  const long long reads = (long long)rows * p.k_part * tile_shape(math).elem_bytes;
  return p.parts == 1 ? reads : reads + 2LL * p.m_rows * rows * 4 + kPartFixedBytes;
}

// The number of K parts, among the powers of two that divide group_blocks, leave the last rank
// some K and fit in smem_limit without staging:
// k_parts = 0 (auto): the one with the fewest step_bytes (ties: fewer) and with at least
//   kMinPartK columns per rank;
// k_parts > 0: the largest one <= k_parts (1: none);
// never more than kMaxParts (the kernels add the partials in one unrolled pass).
constexpr int kMaxParts = 8;
FRNN_HD constexpr int choose_parts(Cell cell, Math math, int hidden, bool backward,
                                   int max_blocks, int smem_limit, int batch_pad, int groups,
                                   int k_parts) {
  const int rows = batch_pad / groups;
  const int cap = k_parts == 0 ? kMaxParts : imin(k_parts, kMaxParts);
  int best = 1;
  long long best_bytes =
      step_bytes(make_plan(cell, math, hidden, backward, max_blocks, groups), math, rows);
  for (int parts = 2; parts <= cap && parts <= max_blocks; parts *= 2) {
    const Plan p = make_plan(cell, math, hidden, backward, max_blocks, groups, 0, 0, parts);
    if (p.group_blocks % parts != 0 || (k_parts == 0 && p.k_part < kMinPartK) ||
        (parts - 1) * p.k_part >= p.k_pad || p.smem_bytes > smem_limit)
      continue;
    const long long bytes = step_bytes(p, math, rows);
    if (k_parts > 0 || bytes < best_bytes) {
      best = parts;
      best_bytes = bytes;
    }
  }
  return best;
}

// The stage slice for a plan without staging (`base`): as many K columns as the shared memory
// left over allows, all of K if it fits, at most max_stage_k; none if that would be fewer than
// kMinStageK columns (unless K itself is shorter) or max_stage_k is 0. A cap below kMinStageK is
// honoured (tests use it to force several slices).
FRNN_HD constexpr int choose_stage_k(const Plan& base, Math math, int stage_rows, int smem_limit,
                                     int max_stage_k) {
  const TileShape ts = tile_shape(math);
  const int avail = smem_limit - base.smem_bytes;
  if (max_stage_k < kKPad || avail <= 0) return 0;
  int k = (avail / (stage_rows * ts.elem_bytes) - 16 / ts.elem_bytes) / kKPad * kKPad;
  while (k > 0 && round_up(stage_rows * (k + 16 / ts.elem_bytes) * ts.elem_bytes, 128) > avail)
    k -= kKPad;
  if (k < imin(kMinStageK, base.k_part)) return 0;
  return imin(imin(k, base.k_part), max_stage_k / kKPad * kKPad);
}

// What a launch runs with is chosen in one place for the binding (and the CPU simulator):
// select_plan below. smem_bytes may still exceed smem_limit when H is too large; the caller
// refuses that.
struct Selection {
  Math math;
  Plan plan;
};

// The plan with at most max_groups batch groups, each choice made in turn (see select_plan).
FRNN_HD constexpr Selection select_plan_groups(Cell cell, bool is_16bit, bool allow_tf32,
                                               int hidden, bool backward, int max_blocks,
                                               int smem_limit, int batch_pad, int max_groups,
                                               int max_stage_k, int k_parts) {
  const Math math =
      choose_math(is_16bit, allow_tf32, cell, hidden, backward, max_blocks, smem_limit);
  const int groups = choose_groups(cell, math, hidden, backward, max_blocks, smem_limit,
                                   batch_pad, max_groups);
  const int parts = choose_parts(cell, math, hidden, backward, max_blocks, smem_limit,
                                 batch_pad, groups, k_parts);
  const Plan base = make_plan(cell, math, hidden, backward, max_blocks, groups, 0, 0, parts);
  const int rows = imin(kChunkCols, batch_pad / groups);
  const int stage_k = choose_stage_k(base, math, rows, smem_limit, max_stage_k);
  return Selection{math, make_plan(cell, math, hidden, backward, max_blocks, groups, rows,
                                   stage_k, parts)};
}

// A stage that takes a block's K part in at most kMaxStageSlices slices a chunk.
constexpr int kMaxStageSlices = 3;
FRNN_HD constexpr bool well_staged(const Plan& p) {
  return p.stage_k > 0 && kMaxStageSlices * p.stage_k >= p.k_part;
}

// What a launch runs with: the math, then the most batch groups that fit, the K parts for
// them, and a stage in what shared memory is left (select_plan_groups). More groups take more
// shared memory for W, and where they leave too little for a stage, the X operand is read
// without one (or in many thin slices). On the H200 (run 2, the cuda-direct rows) staging was
// worth 1.2-1.6x at S3 and S4, with at most 3 slices a chunk, and two groups over one 1.05x at
// most. So where the stage would be missing or take more than kMaxStageSlices slices a chunk,
// and the stage_k cap (max_stage_k) allows a full one, fewer groups are tried, most first:
// the first plan that is well staged runs; if none is, the plan with the most groups does.
FRNN_HD constexpr Selection select_plan(Cell cell, bool is_16bit, bool allow_tf32, int hidden,
                                        bool backward, int max_blocks, int smem_limit,
                                        int batch_pad, int max_groups, int max_stage_k,
                                        int k_parts = 1) {
  const Selection most = select_plan_groups(cell, is_16bit, allow_tf32, hidden, backward,
                                            max_blocks, smem_limit, batch_pad, max_groups,
                                            max_stage_k, k_parts);
  if (well_staged(most.plan) || max_stage_k < most.plan.k_part) return most;
  for (int g = most.plan.groups - 1; g >= 1; --g) {
    const Selection s = select_plan_groups(cell, is_16bit, allow_tf32, hidden, backward,
                                           max_blocks, smem_limit, batch_pad, g, max_stage_k,
                                           k_parts);
    if (s.plan.groups == g && well_staged(s.plan)) return s;
  }
  return most;
}

// The grid cap (FUSED_RNN_CUDA_MAX_BLOCKS; block_cap 0 = none). By default a launch spreads H
// over up to one block per SM (max_blocks), the thinnest slices. Fewer, fatter blocks pay a
// cheaper grid.sync() and read the exchange buffer fewer times per step, while each block's
// warps take more of the matmul (fewer K splits), so which wins is a measurement. With a cap the
// plan is selected for the fewest blocks >= block_cap whose plan fits in smem_limit with the
// same math as without the cap (a cap never trades TF32 for FMA); at worst that is the uncapped
// plan. A scan, since shared memory is not monotone in the block count (padding): at most
// max_blocks selections on the host per launch, microseconds.
FRNN_HD constexpr Selection select_plan_capped(Cell cell, bool is_16bit, bool allow_tf32,
                                               int hidden, bool backward, int max_blocks,
                                               int smem_limit, int batch_pad, int max_groups,
                                               int max_stage_k, int k_parts, int block_cap) {
  const Selection full = select_plan(cell, is_16bit, allow_tf32, hidden, backward, max_blocks,
                                     smem_limit, batch_pad, max_groups, max_stage_k, k_parts);
  for (int b = imax(block_cap, 1); block_cap > 0 && b < max_blocks; ++b) {
    const Selection s = select_plan(cell, is_16bit, allow_tf32, hidden, backward, b, smem_limit,
                                    batch_pad, max_groups, max_stage_k, k_parts);
    if (s.math == full.math && s.plan.smem_bytes <= smem_limit) return s;
  }
  return full;
}

// Cluster mode (FUSED_RNN_CUDA_CLUSTER, sm_90+): batch groups never exchange data, so when each
// group's blocks form one thread-block cluster, the step barrier can be the cluster's hardware
// barrier instead of grid.sync() across the whole chip, and the groups need not even be
// co-resident with each other. This picks, among the group counts choose_groups allows (most
// first), the first whose plan spreads each group over at most cluster_max blocks, fits in
// smem_limit and keeps the uncapped plan's math: plan.groups clusters of plan.group_blocks
// blocks. found = false when no group count does (the caller then runs the grid plan).
struct ClusterSelection {
  bool found;
  Selection sel;
};
FRNN_HD constexpr ClusterSelection select_plan_clustered(Cell cell, bool is_16bit,
                                                         bool allow_tf32, int hidden,
                                                         bool backward, int max_blocks,
                                                         int smem_limit, int batch_pad,
                                                         int max_groups, int max_stage_k,
                                                         int k_parts, int cluster_max) {
  const Selection full = select_plan(cell, is_16bit, allow_tf32, hidden, backward, max_blocks,
                                     smem_limit, batch_pad, max_groups, max_stage_k, k_parts);
  const int tiles = batch_pad / kBatchPad;
  for (int g = imin(imin(max_groups, tiles), max_blocks); g >= 1 && cluster_max >= 1; --g) {
    if (tiles % g != 0) continue;
    const Selection s =
        select_plan(cell, is_16bit, allow_tf32, hidden, backward, imin(max_blocks, g * cluster_max),
                    smem_limit, batch_pad, g, max_stage_k, k_parts);
    if (s.math == full.math && s.plan.groups == g && s.plan.group_blocks <= cluster_max &&
        s.plan.smem_bytes <= smem_limit)
      return ClusterSelection{true, s};
  }
  return ClusterSelection{false, full};
}

// Which blocks form thread-block clusters (sm_90+), and so which barriers are the cluster's:
//   kClusterNone:   one cooperative grid; the step barrier and the K parts' barrier are both
//                   grid.sync();
//   kClusterGroups: each batch group is one cluster of plan.group_blocks blocks (plan.h
//                   select_plan_clustered) in an ordinary launch; both barriers are the
//                   cluster's (groups share nothing);
//   kClusterTeams:  each K-parts team is one cluster of plan.parts blocks in a cooperative
//                   launch; the step barrier stays grid.sync(), the parts' barrier (the team
//                   adding its partial sums) becomes the cluster's.
//   kClusterGroupsDsmem: as kClusterGroups, and the exchange never leaves the cluster: each
//                   block keeps its group's exchange rows in shared memory (two buffers,
//                   mirror_bytes each) and writes what it computes straight into its peers'
//                   copies (distributed shared memory), so the matmul reads X locally with no
//                   copy from L2 (plan.h choose_launch; rnn_common.cuh Exchange).
enum ClusterMode : int {
  kClusterNone = 0, kClusterGroups = 1, kClusterTeams = 2, kClusterGroupsDsmem = 3
};

// The shared-memory mirror of kClusterGroupsDsmem: per buffer, the group's exchange rows
// (batch_pad / groups of them) with a row stride of k_pad plus 16 bytes (bank spread, like the
// stage; keeps every fragment origin 32-byte aligned), rounded to 128 bytes.
FRNN_HD constexpr int mirror_ld(const Plan& p, Math math) {
  return p.k_pad + 16 / tile_shape(math).elem_bytes;
}
FRNN_HD constexpr int mirror_bytes(const Plan& p, Math math, int batch_pad) {
  return bytes_128(static_cast<long long>(batch_pad / p.groups) * mirror_ld(p, math) *
                   tile_shape(math).elem_bytes);
}

// What a launch runs with, every setting applied: binding.cpp's checked_plan and cudasim's
// (tests/cuda/sim/sim_api.cpp) call this one function. cluster_max > 0 (FUSED_RNN_CUDA_CLUSTER)
// tries select_plan_clustered first; otherwise select_plan_capped (max_blocks 0 = no cap) and,
// with team_clusters (FUSED_RNN_CUDA_TEAM_CLUSTERS) and K parts, teams as clusters. Clusters
// only where has_clusters (sm_90+).
// dsmem (FUSED_RNN_CUDA_CLUSTER_EXCHANGE=dsmem) turns a cluster-groups launch into
// kClusterGroupsDsmem where the same group count also fits without staging and without K parts
// with the two mirrors added: the plan is selected with max_stage_k = 0 and k_parts = 1 (the
// mirror is the stage: X is local already), and its smem_bytes include the mirrors, which start
// where the stage would (after the W slice and the scratch slots). Elsewhere the
// cluster-groups launch runs as without dsmem.
struct LaunchChoice {
  Selection sel;
  int cluster;  // ClusterMode
};
FRNN_HD constexpr LaunchChoice choose_launch(Cell cell, bool is_16bit, bool allow_tf32,
                                             int hidden, bool backward, int sms, int smem_limit,
                                             int batch_pad, int max_groups, int max_stage_k,
                                             int k_parts, int max_blocks, int cluster_max,
                                             bool team_clusters, bool has_clusters,
                                             bool dsmem = false) {
  if (has_clusters && cluster_max > 0) {
    const ClusterSelection cs =
        select_plan_clustered(cell, is_16bit, allow_tf32, hidden, backward, sms, smem_limit,
                              batch_pad, max_groups, max_stage_k, k_parts, cluster_max);
    if (cs.found && dsmem) {
      const ClusterSelection ds =
          select_plan_clustered(cell, is_16bit, allow_tf32, hidden, backward, sms, smem_limit,
                                batch_pad, cs.sel.plan.groups, 0, 1, cluster_max);
      Plan p = ds.sel.plan;
      const long long mirrors = 2LL * mirror_bytes(p, ds.sel.math, batch_pad);
      if (ds.found && p.groups == cs.sel.plan.groups && p.parts == 1 && p.stage_k == 0 &&
          p.smem_bytes + mirrors <= smem_limit) {
        p.smem_bytes += static_cast<int>(mirrors);
        return LaunchChoice{Selection{ds.sel.math, p}, kClusterGroupsDsmem};
      }
    }
    if (cs.found) return LaunchChoice{cs.sel, kClusterGroups};
  }
  const Selection sel = select_plan_capped(cell, is_16bit, allow_tf32, hidden, backward, sms,
                                           smem_limit, batch_pad, max_groups, max_stage_k,
                                           k_parts, max_blocks);
  const bool teams = has_clusters && team_clusters && sel.plan.parts > 1;
  return LaunchChoice{sel, teams ? kClusterTeams : kClusterNone};
}

// Register blocking of a chunk's matmul (rnn_common.cuh chunk_matmul). A chunk has mfr x nfr
// output tiles (W-row tiles x batch tiles). Unblocked, a warp multiplies one tile at a time: per
// k-step it loads one A and one B fragment from shared memory for one MMA, and its MMAs form one
// dependent chain. A block of bm x bn adjacent tiles loads bm A and bn B fragments for bm * bn
// independent MMAs: fewer shared-memory loads per MMA, and chains that overlap. Each tile's K
// order is the unblocked one, so blocking never changes a bit of the results.
// Chosen per chunk: among 1x1, 2x1, 1x2 and 2x2 blocks (the ones that divide the tiles, at most
// max_tiles tiles; the FMA path and max_tiles < 2 never block), the one whose busiest warp has
// the fewest tiles to do, counting a block as its tiles; ties go to the larger block. A chunk with
// fewer tiles than warps (which splits K across warps instead) is never blocked.
struct TileBlock {
  int bm, bn;  // tiles per block along W rows and along the batch
};

FRNN_HD constexpr TileBlock tile_block(Math math, int mfr, int nfr, int max_tiles) {
  TileBlock best{1, 1};
  if (math == Math::kFma || mfr * nfr < kWarps) return best;
  int best_load = ceil_div(mfr * nfr, kWarps);
  const TileBlock shapes[3] = {{2, 1}, {1, 2}, {2, 2}};
  for (int i = 0; i < 3; ++i) {
    const TileBlock b = shapes[i];
    const int size = b.bm * b.bn;
    if (size > max_tiles || mfr % b.bm != 0 || nfr % b.bn != 0) continue;
    const int load = ceil_div((mfr / b.bm) * (nfr / b.bn), kWarps) * size;
    if (load < best_load || (load == best_load && size > best.bm * best.bn)) {
      best = b;
      best_load = load;
    }
  }
  return best;
}

}  // namespace fused_rnn
