"""Mutants of the CUDA kernels and of their binding, each run against the tests that should catch
it: whether a clean run of the cudasim tests means something. By hand after changing ``csrc/``
(not in the suite):

    python tests/cuda/mutation_sweep.py [--full] [NAME ...]

A mutant is one textual change to one source of ``csrc/`` (MUTANTS: a wrong index, bound,
guard, sum, rounding or barrier in a kernel; a wrong allocation, parameter or check in
binding.cpp). Each is applied to a copy of the checkout (the files git lists; the tests read
the ``csrc/`` beside them), built on cudasim, and run against:

1. A kernel's: ``test_accuracy_sweep.py`` (about 20 s with the build): random plans held to
   the accuracy rule. Most mutants fail it. binding.cpp's: its host build (host_binding.py)
   in ``test_host_binding.py`` and behind ``test_cuda_gpu.py`` (a build of 25 s, then about two
   minutes).
2. With ``--full``, for the mutants marked ``caught_by="suite"`` (those the sweep lets through):
   ``test_host_binding.py`` and ``test_cuda_gpu.py`` behind the host build of the binding,
   then ``test_cuda_sim.py`` (thread orders, TSan, ASan, the emulation's rounding points),
   stopping at the first failure; up to ten minutes each.
   binding.cpp's marked ``caught_by="asan"``: ``test_cuda_sim.py``'s AddressSanitizer case,
   binding and kernels instrumented.

One line a mutant: caught (and where), or survived. Exit code 1 if a mutant survived what
should catch it, was caught where it is marked ``equivalent`` (then its reason is wrong), or
no longer builds (the list is out of date). ``test_mutation_sweep.py`` checks in the suite that
each mutant's text still stands exactly once in its file: a change to the kernels that moves
it has to move the mutant too, or drop it with the code it mutated. Mutants whose reason is
``equivalent`` change nothing a result can show; they are kept so that the claim is rerun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
COMMON, FORWARD, BACKWARD = "rnn_common.cuh", "rnn_forward.cu", "rnn_backward.cu"
BINDING = "binding.cpp"


class Mutant(NamedTuple):
    name: str
    file: str  # in csrc/
    what: str
    old: str  # stands exactly once in the file
    new: str
    # the kernels': "sweep" (test_accuracy_sweep.py) or "suite" (the cudasim test files);
    # binding.cpp's: "binding" (BINDING_TESTS) or "asan" (ASAN)
    caught_by: str = "sweep"
    equivalent: str = ""  # why no result can show it (then nothing is expected to catch it)


def _binding(name: str, what: str, old: str, new: str, caught_by: str = "binding",
             equivalent: str = "") -> Mutant:
    return Mutant(name, BINDING, what, old, new, caught_by, equivalent)


MUTANTS = [
    Mutant("swz_bit", COMMON, "the mma path's W swizzle keyed on row bit 1, not bit 2",
           "(swizzle ? r & 4 : 0)",
           "(swizzle ? r & 2 : 0)"),
    Mutant("lda_unswz", COMMON, "MmaTf32Ops::load_a reads W unswizzled",
           "((j >> 1) ^ (i >> 2)) * 4",
           "(j >> 1) * 4"),
    Mutant("zero_half", COMMON, "zero_w clears half the W region",
           "i < pl.w_bytes / 16",
           "i < pl.w_bytes / 32"),
    Mutant("copyw_store_pastrows", COMMON, "copy_w_slice stores the rows past the slice it read as row 0",
           "if (rs[i] < rows && v[i].ok)",
           "if (v[i].ok)"),
    Mutant("copyw_wrap", COMMON, "copy_w_slice's column wrap one late",
           "if (c >= cols) {",
           "if (c > cols) {"),
    Mutant("wfwd_k_le", COMMON, "the forward W slice takes column H (the next row's first)",
           "k0 + kk < hidden;",
           "k0 + kk <= hidden;"),
    Mutant("wfwd_no_gcount", COMMON, "the forward W slice's gate-count guard dropped",
           "const bool ok = g < g_count && ",
           "const bool ok = g_count > 0 && ",
           equivalent="the slice has G x team-units rows (plan.h m_rows), so g < G always"),
    Mutant("wbwd_kpad", COMMON, "the backward W slice reads K columns up to k_pad",
           "k0 + kk < pl.k;",
           "k0 + kk < pl.k_pad;"),
    Mutant("gather_extra", COMMON, "gather adds one K-split slot too many",
           "if (s < L.ksplit) acc +=",
           "if (s <= L.ksplit) acc +="),
    Mutant("blk_drop_odd", COMMON, "block_mma drops an odd last k-step",
           "    if (kk < ke) mma(a0, b0);\n",
           "\n"),
    Mutant("blk_prefetch_short", COMMON, "block_mma skips loading the last k-step of an even run",
           "if (kk + 2 < ke) load(a0, b0, kk + 2);",
           "if (kk + 3 < ke) load(a0, b0, kk + 2);"),
    Mutant("blk_mma_kb", COMMON, "the mma path's block_mma loads k-step kb every time",
           "      load(a0, b0, kk);\n      mma(a0, b0);",
           "      load(a0, b0, kb);\n      mma(a0, b0);"),
    Mutant("fma_rows", COMMON, "the FMA tile skips its last W row",
           "if (r < rows_left) {",
           "if (r + 1 < rows_left) {"),
    Mutant("fma_noacc", COMMON, "the FMA tile does not add earlier stage slices",
           "acc[c] = accumulate ? out[4 * c] : 0.f;",
           "acc[c] = (accumulate && false) ? out[4 * c] : 0.f;"),
    Mutant("tile_noacc", COMMON, "tile_mma does not add earlier stage slices",
           "  if (accumulate)\n    Ops::template load_c<Sh>(acc, slot, Ops::kLdSlot);",
           "  if (accumulate && false)\n    Ops::template load_c<Sh>(acc, slot, Ops::kLdSlot);"),
    Mutant("blk_noacc", COMMON, "block_mma does not add earlier stage slices",
           "      if (accumulate)\n        Ops::template load_c<Sh>(acc[i][j]",
           "      if (accumulate && false)\n        Ops::template load_c<Sh>(acc[i][j]"),
    Mutant("stage_no_commit", COMMON, "stage_issue never commits its cp.async group",
           "                                            int rows, int cols) {\n  constexpr int kVec = 16 / sizeof(T);\n  const int per_row = cols / kVec;\n  const int total = rows * per_row;\n  for (int i = threadIdx.x; i < total; i += kThreads)\n    cp_async16(dst + (size_t)(i / per_row) * ld_dst + (i % per_row) * kVec,\n               src + (size_t)(i / per_row) * ld_src + (i % per_row) * kVec);\n  cp_async_commit();",
           "                                            int rows, int cols) {\n  constexpr int kVec = 16 / sizeof(T);\n  const int per_row = cols / kVec;\n  const int total = rows * per_row;\n  for (int i = threadIdx.x; i < total; i += kThreads)\n    cp_async16(dst + (size_t)(i / per_row) * ld_dst + (i % per_row) * kVec,\n               src + (size_t)(i / per_row) * ld_src + (i % per_row) * kVec);\n"),
    Mutant("wait2", COMMON, "the pipelined copy waits for all but two groups",
           "cp_async_wait<1>();",
           "cp_async_wait<2>();"),
    Mutant("pipe_any16", COMMON, "pipelined staging for stage_k a multiple of 16, not 32",
           "pl.stage_k % (2 * kKPad) == 0",
           "pl.stage_k % kKPad == 0"),
    Mutant("task_drop_last_k", COMMON, "a K-split task drops the slice's last k-step",
           "ke = (ks + 1) * ksteps / ksplit;",
           "ke = imin((ks + 1) * ksteps / ksplit, ksteps - 1);"),
    Mutant("blk_nf", COMMON, "run_blocks' batch tile not scaled by BN",
           "nf = blk % bnr * BN;",
           "nf = blk % bnr;"),
    Mutant("blk_count", COMMON, "run_blocks skips its last block of tiles",
           "const int blocks = (mfr / BM) * bnr;",
           "const int blocks = (mfr / BM) * bnr - 1;"),
    Mutant("nb_short", COMMON, "a chunk's last real batch row dropped",
           "const int nb = imin(ncols, batch - n0);",
           "const int nb = imin(ncols, batch - n0 - 1);"),
    Mutant("part_write_short", COMMON, "the K-parts partial sums of a chunk's last row not written",
           "idx < nb * pl.m_rows;",
           "idx < (nb - 1) * pl.m_rows;"),
    Mutant("parts_drop_last", COMMON, "the K-parts sum drops the last rank's partial",
           "v[r] = r < pl.parts ? p[r * rank_stride] : 0.f;",
           "v[r] = r + 1 < pl.parts ? p[r * rank_stride] : 0.f;"),
    Mutant("nend_pad", COMMON, "a group runs its padding rows",
           "b.n_end = imin(b.n_begin + b.group_rows, batch);",
           "b.n_end = imin(b.n_begin + b.group_rows, batch + (1 << 30));"),
    Mutant("klen_full", COMMON, "a team's last K rank multiplies a whole part past k_pad",
           "b.klen = imin(pl.k_part, pl.k_pad - b.k0);",
           "b.klen = pl.k_part;", caught_by="suite"),
    Mutant("mma_global_x", COMMON, "the mma path kept with X in global memory",
           "kFragMma && !(M == Math::kTf32 && x_shared)",
           "kFragMma && !(M == Math::kTf32 && (x_shared || true))"),
    Mutant("team_u0", COMMON, "a K-parts team's first unit not scaled by the team size",
           "b.team_u0 = b.team * team_units(pl);",
           "b.team_u0 = b.team * pl.units;"),
    Mutant("dsmem_last_peers", COMMON, "the last step's DSMEM exchange stores into the peers",
           "last ? 0 : peers, 0u};",
           "(last && false) ? 0 : peers, 0u};"),
    Mutant("finish_short", COMMON, "Exchange::finish skips the group's last row",
           "i < (n_end - row0) * nu;",
           "i < (n_end - row0 - 1) * nu;"),
    Mutant("put_peers_short", COMMON, "the DSMEM exchange skips the last peer",
           "for (int r = 0; r < peers; ++r)",
           "for (int r = 0; r < peers - 1; ++r)"),
    Mutant("finish_guard", COMMON, "a point batch finishes units past the block's",
           "        if (idx < count && j < nu) pt.finish(b, j, in[q]);",
           "        if (idx < count) pt.finish(b, j, in[q]);"),
    Mutant("points_stride", COMMON, "point batches overlap (each cell applied twice)",
           "base += kThreads * P)",
           "base += kThreads * (P - 1))"),
    Mutant("ncols_group", COMMON, "a group's last chunk runs into the next group's rows",
           "const int ncols = imin(kChunkCols, bs.n_begin + bs.group_rows - n0);",
           "const int ncols = kChunkCols;"),
    Mutant("gather_own", COMMON, "the epilogue's gather drops the rank's row offset",
           "return gather<M>(bs.sc, pl, L, g * tu + own + j, b - n0);",
           "return gather<M>(bs.sc, pl, L, g * tu + j, b - n0);",
           equivalent="without K parts a block's rank is 0, so its row offset is 0"),
    Mutant("parts_in_own", COMMON, "the K-parts sum reads from the team's first unit",
           "const float* in = part + (size_t)bs.team * pl.m_rows + own;",
           "const float* in = part + (size_t)bs.team * pl.m_rows;"),
    Mutant("parts_out_team", COMMON, "the K-parts partials written without the team's offset",
           "(size_t)bs.rank * batch_pad * pl.part_ld + (size_t)bs.team * pl.m_rows;",
           "(size_t)bs.rank * batch_pad * pl.part_ld;"),
    Mutant("parts_sync_teams_only", COMMON, "batch-group clusters with K parts use grid.sync for the parts",
           "if (cluster != kClusterNone) cluster_sync();",
           "if (cluster == kClusterTeams) cluster_sync();"),
    Mutant("ldb_bits", COMMON, "MmaTf32Ops::load_b's row and k halves swapped",
           "x + (size_t)(i + (j >> 1) * 8) * ldx + kk * 8 + (j & 1) * 4",
           "x + (size_t)(i + (j & 1) * 8) * ldx + kk * 8 + (j >> 1) * 4"),
    Mutant("mma_at_row", COMMON, "MmaTf32Ops::at's row from the wrong bit",
           "(size_t)(g + (q >> 1) * 8) * ld",
           "(size_t)(g + (q & 1) * 8) * ld"),
    Mutant("mma_b_swap", COMMON, "the two mma.sync halves get each other's B registers",
           "b0[2] = {b.r[0], b.r[1]}, b1[2] = {b.r[2], b.r[3]};",
           "b0[2] = {b.r[0], b.r[2]}, b1[2] = {b.r[1], b.r[3]};"),
    Mutant("wmma_b_noround", COMMON, "WMMA's TF32 X operand not rounded (the tensor cores truncate it)",
           "for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);",
           "", caught_by="suite"),
    Mutant("mma_b_noround", COMMON, "mma.sync's TF32 X operand not rounded (the tensor cores truncate it)",
           "for (int q = 0; q < 4; ++q) b.r[q] = tf32_bits(__uint_as_float(b.r[q]));",
           "for (int q = 0; q < 4; ++q) b.r[q] = b.r[q];", caught_by="suite"),
    Mutant("w_noround", COMMON, "the TF32 W slice not rounded (the tensor cores truncate it)",
           "  return wmma::__float_to_tf32(v);\n",
           "  return v;\n", caught_by="suite"),
    Mutant("stage_short", COMMON, "the cp.async stage copy skips its last vector",
           "  for (int i = threadIdx.x; i < total; i += kThreads)\n    cp_async16(",
           "  for (int i = threadIdx.x; i < total - 1; i += kThreads)\n    cp_async16("),
    Mutant("stagereg_col", COMMON, "the register stage copy stores vectors at element offsets",
           "*reinterpret_cast<uint4*>(dst + (size_t)(i / per_row) * ld_dst + (i % per_row) * kVec) =",
           "*reinterpret_cast<uint4*>(dst + (size_t)(i / per_row) * ld_dst + (i % per_row)) ="),
    Mutant("nfr_floor", COMMON, "the matmul skips a partial last batch tile",
           "const int nfr = ceil_div(nreal, ts.wn);",
           "const int nfr = imax(1, nreal / ts.wn);"),
    Mutant("pipe_same_buf", COMMON, "the pipelined stage reads one buffer for every slice",
           "T* buf = stage + (pipe ? (s & 1) * slice_k : 0);",
           "T* buf = stage;"),
    Mutant("pipe_issue_buf", COMMON, "the pipelined copy issues the next slice into the current buffer",
           "stage_issue(stage + ((s + 1) & 1) * slice_k,",
           "stage_issue(stage + (s & 1) * slice_k,"),
    Mutant("step_point_le", COMMON, "a step launch runs one point past B x H",
           "if (idx >= (long long)batch * hidden) return false;",
           "if (idx > (long long)batch * hidden) return false;"),
    Mutant("step_exch_same", COMMON, "the step path reads and writes one exchange buffer",
           "return {b + (s & 1) * one, b + ((s + 1) & 1) * one, ld, 0, 0, 0u};",
           "return {b + (s & 1) * one, b + (s & 1) * one, ld, 0, 0, 0u};"),
    Mutant("launch_points_floor", COMMON, "a step launch drops its partial last block",
           "const long long blocks = (points + kStepThreads - 1) / kStepThreads;",
           "const long long blocks = points / kStepThreads + (points < kStepThreads);"),
    Mutant("pad_gt", FORWARD, "padding starts one step late",
           "in.pad = p.lengths != nullptr && t >= p.lengths[b];",
           "in.pad = p.lengths != nullptr && t > p.lengths[b];"),
    Mutant("gru_n_form", FORWARD, "GRU's n gate as tanh(r * (x_n + h_n))",
           "const float nn = tanhf(in.xn + r * in.hn);",
           "const float nn = tanhf(r * (in.xn + in.hn));"),
    Mutant("pad_no_aux_c", FORWARD, "a padding step does not save LSTM's carried c",
           "if (C == Cell::kLSTM && p.save) p.aux[tbu] = in.c;",
           ""),
    Mutant("bih_drop", FORWARD, "b_ih given apart is not added",
           "? xg[(size_t)g * H] + p.b_ih[g * H + u]",
           "? xg[(size_t)g * H]"),
    Mutant("fwd_no_finish", FORWARD, "DSMEM's h_T not copied out",
           "  ex.finish(p.steps, bs.n_end, bs.u0, bs.nu);",
           ""),
    Mutant("pad_put_zero", FORWARD, "a padding step publishes zeros, not the held h",
           "    ex.put(b, u, in.hin);",
           "    ex.put(b, u, from_float<T>(0.f));"),
    Mutant("bwd_cprev_gt", BACKWARD, "the backward takes c0 for step 0's c_{t-1} one step early",
           "(tp >= 0 && tp < Tn)",
           "(tp > 0 && tp < Tn)"),
    Mutant("bwd_pad_carry", BACKWARD, "a padding step adds its dy to the carried dh",
           "      p.dh_carry[bh] = in.dh_in;\n",
           "      p.dh_carry[bh] = in.dh_in + in.dy;\n"),
    Mutant("gru_dgr_n", BACKWARD, "GRU's recurrent dgate of n without r",
           "dgr[2] = dn * r;",
           "dgr[2] = dn;"),
    Mutant("relu_lt", BACKWARD, "relu' passes the gradient where the output is 0",
           "(act <= 0.f ? 0.f : dh)",
           "(act < 0.f ? 0.f : dh)"),
    Mutant("bwd_step_ld", BACKWARD, "the backward step path's exchange stride H, not G*H",
           "step_exchange<T>(p.dgbuf, p.batch, gates_of(C) * H, a.s)",
           "step_exchange<T>(p.dgbuf, p.batch, H, a.s)"),
    Mutant("bwd_norec_pad", BACKWARD, "the recurrent gradient added after a padding step (0 * inf = NaN)",
           "const bool no_rec = s == 0 || (p.lengths != nullptr && t_before >= p.lengths[b]);",
           "const bool no_rec = s == 0 || (false && p.lengths != nullptr && t_before >= p.lengths[b]);", caught_by="suite"),
    Mutant("bwd_pad_dghn", BACKWARD, "a padding step leaves GRU's dghn unwritten",
           "      if (C == Cell::kGRU) static_cast<T*>(p.dghn)[tbh] = from_float<T>(0.f);\n",
           ""),
    Mutant("bwd_dh0_skip", BACKWARD, "dh0 zeroed unless T > 1",
           "      p.dh0[bh] = in.dh_in;\n",
           "      p.dh0[bh] = in.dh_in * (s > 1);\n"),
    Mutant("race_zero_w", COMMON, "no barrier between zeroing the W region and storing the slice",
           "p[i] = make_uint4(0, 0, 0, 0);\n  __syncthreads();",
           "p[i] = make_uint4(0, 0, 0, 0);\n"),
    Mutant("race_slice_reuse", COMMON, "no barrier before a stage buffer is refilled",
           "      if (s > 0) __syncthreads();",
           "      if (s > 0 && false) __syncthreads();"),
    Mutant("race_stage_landed", COMMON, "no barrier after the stage copy lands",
           "      __syncthreads();  // ... and for every thread",
           ""),
    Mutant("race_after_matmul", COMMON, "no barrier between the matmul's slots and the epilogue",
           "                                                     bs.max_tiles, bs.frag_loads, clk);\n"
           "    __syncthreads();",
           "                                                     bs.max_tiles, bs.frag_loads, clk);\n"),
    Mutant("race_slots_reuse", COMMON, "no barrier before the next chunk reuses the slots",
           "    __syncthreads();  // the slots are reused by the next chunk",
           "    //"),
    Mutant("race_mirror_zero", COMMON, "no barrier after zeroing the DSMEM mirrors",
           "z[i] = make_uint4(0, 0, 0, 0);\n    __syncthreads();",
           "z[i] = make_uint4(0, 0, 0, 0);\n"),
    Mutant("race_mirror_load", COMMON, "no block barrier after loading h0 into the mirror",
           "            *reinterpret_cast<const uint4*>(global + (size_t)(row0 + r) * k_pad + c);\n      }\n      __syncthreads();",
           "            *reinterpret_cast<const uint4*>(global + (size_t)(row0 + r) * k_pad + c);\n      }\n",
           equivalent="the cluster barrier right after it orders the block's threads too"),
    Mutant("race_finish", COMMON, "no barrier before Exchange::finish reads the last step's mirror",
           "    if (!dsmem) return;\n    __syncthreads();\n    const T* src",
           "    if (!dsmem) return;\n    const T* src",
           equivalent="dsmem plans have no K parts (plan.h choose_launch), and block_step's chunk "
                      "loop ends at a block barrier after the last epilogue's writes"),
    Mutant("race_fwd_wload", FORWARD, "no barrier after the forward's W slice load",
           "  __syncthreads();\n  clk.mark(kPhaseLoad);",
           "  clk.mark(kPhaseLoad);"),
    Mutant("race_bwd_wload", BACKWARD, "no barrier after the backward's W slice load",
           "  __syncthreads();\n  clk.mark(kPhaseLoad);",
           "  clk.mark(kPhaseLoad);", caught_by="suite"),
    Mutant("gru_aux_xn", FORWARD, "GRU saves x_n, not W_hn h + b_hn",
           "        p.aux[tbu] = in.hn;",
           "        p.aux[tbu] = in.xn;"),
    Mutant("gather_slot_ld", COMMON, "gather's slot row stride without its padding",
           "(m % ts.wm) * (ts.wn + kSlotPad)",
           "(m % ts.wm) * ts.wn"),
    Mutant("mirror_load_short", COMMON, "h0's last row of a group not loaded into the mirror",
           "i < rows * per_row; i += kThreads) {",
           "i < (rows - 1) * per_row; i += kThreads) {"),
    Mutant("fwd_step_t", FORWARD, "the forward step path ignores reverse",
           "pt{p, ex, p.reverse ? p.steps - 1 - a.s : a.s, 0};",
           "pt{p, ex, a.s, 0};"),
    Mutant("stagereg_load_guard", COMMON, "the register stage copies load past the rows",
           "      if (i < total) v[j] = load(i);",
           "      if (true) v[j] = load(i);", caught_by="suite"),
    Mutant("bwd_dc_carry", BACKWARD, "LSTM's carried dc without the forget gate",
           "p.dc_carry[bh] = dc * f;",
           "p.dc_carry[bh] = dc;"),
    Mutant("bwd_lstm_dg1", BACKWARD, "LSTM's forget-gate gradient from c_t, not c_{t-1}",
           "dg[1] = dc * in.cprev * f * (1.f - f);",
           "dg[1] = dc * in.aux * f * (1.f - f);"),
    Mutant("fwd_b_hh_drop", FORWARD, "b_hh not added",
           "const float hh = rec(g) + (p.b_hh != nullptr ? p.b_hh[g * H + u] : 0.f);",
           "const float hh = rec(g);"),
    Mutant("bwd_t_before", BACKWARD, "the padding test of the recurrent gradient one step off",
           "const int t_before = p.reverse ? s - 1 : Tn - s;",
           "const int t_before = p.reverse ? s : Tn - s - 1;"),
    # the tagged exchange (fused_rnn.h kStageTagged): its poll, tags, padding and words
    Mutant("tag_no_poll", COMMON, "the tagged stage copy takes each word as first loaded",
           "        while (!tagged_as(v, tag, n)) {",
           "        while (false) {"),
    Mutant("tag_wait_padding", COMMON, "the tagged stage copy waits for the padding columns too",
           "        const int n = real - c;",
           "        const int n = real + 4 - c;"),
    Mutant("tag_period2", COMMON, "tags repeat every two steps (a stale word passes for new)",
           "(static_cast<unsigned>(s % 65535) + 1u) << 16",
           "(static_cast<unsigned>(s % 2) + 1u) << 16"),
    Mutant("tag_put_step", COMMON, "put() tags a value with the step that wrote it",
           "              exchange_tag(s + 1)};",
           "              exchange_tag(s)};"),
    Mutant("tag_get_plain", COMMON, "get() reads a tagged buffer as plain elements",
           "      if (tag != 0u)\n        return *reinterpret_cast<const T*>(",
           "      if (false)\n        return *reinterpret_cast<const T*>("),
    Mutant("tag_store_high", COMMON, "put() stores the value in the tag's half",
           "store_word(reinterpret_cast<unsigned*>(out) + at(b, k), tag | value_bits(v));",
           "store_word(reinterpret_cast<unsigned*>(out) + at(b, k), tag | (value_bits(v) << 16));"),
    Mutant("tag_fwd_sync", FORWARD, "the tagged forward ends its steps at the grid barrier too",
           "      if constexpr (!Tagged) bar.sync();  // tagged: the next stage copy waits for the words",
           "      bar.sync();",
           equivalent="a barrier more orders more: the same reads of the same words"),
    Mutant("copyw_batch_row0", COMMON, "copy_w_slice reads the last row, not row 0, for a row past the slice",
           "v[i] = load(r < rows ? r : 0, c);",
           "v[i] = load(r < rows ? r : rows - 1, c);",
           equivalent="a row past the slice is read only to keep the loads uniform, never stored"),
    # ---- binding.cpp: its checks, allocations, params and per-step loops (the host build)
    _binding("b_hbuf_rows", "the forward exchange buffer without the padding rows",
           "exchange_buffer(tagged, B_pad, plan.k_pad, h0.options(), h0);",
           "exchange_buffer(tagged, c.B, plan.k_pad, h0.options(), h0);"),
    _binding("b_hbuf_ld", "the forward exchange buffer's rows H wide, not k_pad",
           "exchange_buffer(tagged, B_pad, plan.k_pad, h0.options(), h0);",
           "exchange_buffer(tagged, B_pad, c.H, h0.options(), h0);"),
    _binding("b_xbuf_empty", "the exchange buffers (forward and backward) not zeroed",
           "at::Tensor buf = at::zeros({2, B_pad, k_pad}, storage);",
           "at::Tensor buf = at::empty({2, B_pad, k_pad}, storage);"),
    _binding("b_h0_slot", "h0 copied into the exchange buffer's second slot",
           "buf[0].narrow(0, 0, first.size(0)).narrow(1, 0, first.size(1)).copy_(first);",
           "buf[1].narrow(0, 0, first.size(0)).narrow(1, 0, first.size(1)).copy_(first);"),
    _binding("b_hn_slot", "h_n read from the slot the last step did not write",
           "exchange_values(hbuf, c.T % 2, c.B, c.H, tagged, c.st);",
           "exchange_values(hbuf, (c.T + 1) % 2, c.B, c.H, tagged, c.st);"),
    _binding("b_hn_view", "h_n a view of the exchange buffer, not a copy",
           "  return v.clone(at::MemoryFormat::Contiguous);",
           "  return v.contiguous();"),
    # the tagged exchange's buffers (fused_rnn.h kStageTagged)
    _binding("b_tag_first", "buffer 0 of the tagged exchange without step 0's tag",
           "  buf[0].fill_(static_cast<int64_t>(fused_rnn::kFirstTag));\n",
           ""),
    _binding("b_tag_sign", "h0's bits in the tagged words sign-extended into the tag",
           ".bitwise_or_(first.view(at::kShort).to(at::kInt).bitwise_and(0xFFFF));",
           ".bitwise_or_(first.view(at::kShort).to(at::kInt));"),
    _binding("b_tag_hn_high", "h_n read from the tagged words' high halves (the tags)",
           "buf[i].view(at::kShort).narrow(0, 0, B).slice(1, 0, 2 * H, 2)",
           "buf[i].view(at::kShort).narrow(0, 0, B).slice(1, 1, 2 * H + 1, 2)"),
    _binding("b_tag_no_fallback", "the tagged exchange asked of a plan that cannot take it",
           "  if (copy == fused_rnn::kStageTagged && !fused_rnn::tagged_exchange(",
           "  if (false && !fused_rnn::tagged_exchange("),
    _binding("b_tag_bwd_plain", "the backward's tagged launch given a plain buffer",
           "  at::Tensor dgbuf = exchange_buffer(copy == fused_rnn::kStageTagged, B_pad,",
           "  at::Tensor dgbuf = exchange_buffer(false, B_pad,"),
    _binding("b_c0_alias", "the kernels' cell state written into an fp32 c0 in place",
           "c0->to(at::kFloat).contiguous().clone()",
           "c0->to(at::kFloat).contiguous()"),
    _binding("b_dh_alias", "the carried dh written into the caller's dh_n in place",
           "o.dh_carry = dh_n.clone();",
           "o.dh_carry = dh_n;"),
    _binding("b_dc_zero", "LSTM's carried dc starts from zero, not dc_n",
           "o.dc_carry = c.cell == Cell::kLSTM ? dc_n->clone()",
           "o.dc_carry = c.cell == Cell::kLSTM ? dc_n->clone().zero_()"),
    _binding("b_aux_gru", "GRU's forward saves no aux (W_hn h + b_hn)",
           "o.has_aux = save && (c.cell == Cell::kLSTM || c.cell == Cell::kGRU);",
           "o.has_aux = save && c.cell == Cell::kLSTM;"),
    _binding("b_fwd_lengths", "the forward ignores lengths",
           "p.lengths = lengths_ptr(lengths, c.dev, c.B);\n  p.xproj",
           "p.lengths = false ? lengths_ptr(lengths, c.dev, c.B) : nullptr;\n  p.xproj"),
    _binding("b_bwd_lengths", "the backward ignores lengths",
           "p.lengths = lengths_ptr(lengths, c.dev, c.B);\n  p.dy",
           "p.lengths = false ? lengths_ptr(lengths, c.dev, c.B) : nullptr;\n  p.dy"),
    _binding("b_bwd_forward", "the backward runs forward in time for a reversed layer",
           "p.reverse = reverse;\n  p.w_hh",
           "p.reverse = reverse && false;\n  p.w_hh"),
    _binding("b_b_ih_drop", "b_ih handed to the forward kernel dropped",
           "p.b_ih = (b_ih.has_value() && b_ih->defined()) ? b_ih->data_ptr<float>() : nullptr;",
           "p.b_ih = false ? b_ih->data_ptr<float>() : nullptr;"),
    _binding("b_hprev_drop", "GRU's backward without h_{t-1}",
           "p.hprev = gru ? hprev->data_ptr() : nullptr;",
           "p.hprev = false ? hprev->data_ptr() : nullptr;"),
    _binding("b_no_parts_buffer", "no buffer for the K parts' partial sums",
           "  if (plan.parts == 1) return at::Tensor();",
           "  return at::Tensor();"),
    _binding("b_no_cluster", "the plan's cluster mode not handed to the launch",
           "p.cluster = cluster_mode;",
           "p.cluster = false ? cluster_mode : fused_rnn::kClusterNone;"),
    _binding("b_steps_wt", "the per-step forward multiplies by W_hh, not its transpose",
           "const at::Tensor wt = w_hh.t(), h_in[2]",
           "const at::Tensor wt = w_hh, h_in[2]"),
    _binding("b_steps_slot", "the per-step forward's GEMM reads the slot being written",
           "step_mm(rec, h_in[s % 2], wt);",
           "step_mm(rec, h_in[(s + 1) % 2], wt);"),
    _binding("b_steps_bwd_short", "the per-step backward stops before its last launch",
           "for (int64_t s = 0; s <= c.T; ++s) {",
           "for (int64_t s = 0; s < c.T; ++s) {"),
    _binding("b_steps_bpad", "the per-step forward leaves batch_pad unset (0)",
           "  p.batch_pad = static_cast<int>(c.B);\n  at::Tensor rec = at::empty({c.B, c.G * c.H}",
           "  at::Tensor rec = at::empty({c.B, c.G * c.H}",
           equivalent="the step kernels never read batch_pad (only the persistent ones' "
                      "block_state and exchange do); the binding sets it to keep the params "
                      "whole"),
    # The launchers' stream: only the host build of the binding names a current stream other
    # than the legacy one (host_binding.py), so the sweep (behind the mirror) cannot see these.
    Mutant("coop_stream0", COMMON, "the cooperative launch on the legacy stream",
           "dim3(kThreads), args, p.plan.smem_bytes, stream);",
           "dim3(kThreads), args, p.plan.smem_bytes,\n"
           "                                     false ? stream : nullptr);", caught_by="suite"),
    Mutant("cluster_stream0", COMMON, "the cluster launch on the legacy stream",
           "  cfg.stream = stream;\n  cfg.attrs = attr;",
           "  cfg.stream = false ? stream : nullptr;\n  cfg.attrs = attr;", caught_by="suite"),
    Mutant("points_stream0", COMMON, "the per-step launches on the legacy stream",
           "  cfg.stream = stream;\n  cfg.attrs = nullptr;",
           "  cfg.stream = false ? stream : nullptr;\n  cfg.attrs = nullptr;",
           caught_by="suite"),
    _binding("b_fwd_stream0", "the persistent forward launched on the legacy stream",
           "launch_forward<decltype(cl)::value, T_, decltype(m)::value>(p, stream);",
           "launch_forward<decltype(cl)::value, T_, decltype(m)::value>(\n"
           "        p, false ? stream : nullptr);"),
    _binding("b_bwd_stream0", "the persistent backward launched on the legacy stream",
           "launch_backward<decltype(cl)::value, T_, decltype(m)::value>(p, stream);",
           "launch_backward<decltype(cl)::value, T_, decltype(m)::value>(\n"
           "        p, false ? stream : nullptr);"),
    _binding("b_fwd_steps_stream0", "the per-step forward's launches on the legacy stream",
           "launch_forward_step<decltype(cl)::value, T_>(\n"
           "          p, rec.data_ptr<float>(), static_cast<int>(s), stream);",
           "launch_forward_step<decltype(cl)::value, T_>(\n"
           "          p, rec.data_ptr<float>(), static_cast<int>(s), false ? stream : nullptr);"),
    _binding("b_bwd_steps_stream0", "the per-step backward's launches on the legacy stream",
           "launch_backward_step<decltype(cl)::value, T_>(\n"
           "          p, rec.data_ptr<float>(), static_cast<int>(s), stream);",
           "launch_backward_step<decltype(cl)::value, T_>(\n"
           "          p, rec.data_ptr<float>(), static_cast<int>(s), false ? stream : nullptr);"),
    _binding("b_fwd_noguard", "the persistent forward without its device guard",
           "  const c10::cuda::CUDAGuard guard(c.dev);\n"
           "  const Planned pl = planned(c, allow_tf32, /*backward=*/false,",
           "  const Planned pl = planned(c, allow_tf32, /*backward=*/false,"),
    _binding("b_bwd_noguard", "the persistent backward without its device guard",
           "  const c10::cuda::CUDAGuard guard(c.dev);\n"
           "  const Planned pl = planned(c, allow_tf32, /*backward=*/true,",
           "  const Planned pl = planned(c, allow_tf32, /*backward=*/true,"),
    _binding("b_fwd_steps_noguard", "the per-step forward without its device guard",
           "  const c10::cuda::CUDAGuard guard(c.dev);\n  at::Tensor hbuf",
           "  at::Tensor hbuf"),
    _binding("b_bwd_steps_noguard", "the per-step backward without its device guard",
           "  const c10::cuda::CUDAGuard guard(c.dev);\n  at::Tensor dgbuf",
           "  at::Tensor dgbuf"),
    _binding("b_image_noguard", "kernel_image asks the current device, not the one named",
           "  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));\n",
           ""),
    # The per-step GEMM as on a GPU: the CPU has it through HostBinding's stand-in for cuBLAS's
    # 16-bit GEMM (host_binding.py); a refused call is promoted with a warning, the same bits.
    _binding("b_steps_mm_dtype", "the per-step 16-bit GEMM asks for a 16-bit result",
           "      at::mm_out(out, a, b, at::kFloat);",
           "      at::mm_out(out, a, b, a.scalar_type());"),
    _binding("b_steps_mm_swap", "the per-step 16-bit GEMM's operands swapped (the fallback's not)",
           "      at::mm_out(out, a, b, at::kFloat);",
           "      at::mm_out(out, b, a, at::kFloat);"),
    _binding("b_tile_range", "tile_block takes 3",
           "TORCH_CHECK(tiles == 1 || tiles == 2 || tiles == 4,",
           "TORCH_CHECK(tiles >= 1 && tiles <= 4,"),
    _binding("b_no_contiguity", "the tensor check lets a non-contiguous tensor through",
           "TORCH_CHECK(t.is_contiguous(),",
           "TORCH_CHECK(t.is_contiguous() || t.dim() == 2,"),
    _binding("b_numel_shape", "the tensor check compares element counts, not shapes",
           "TORCH_CHECK(t.sizes() == shape,",
           "TORCH_CHECK(t.numel() == c10::multiply_integers(shape),"),
    _binding("b_dtype_size", "the tensor check compares element sizes, not dtypes",
           "TORCH_CHECK(t.scalar_type() == dtype,",
           "TORCH_CHECK(c10::elementSize(t.scalar_type()) == c10::elementSize(dtype),"),
    _binding("b_device_type", "the tensor check compares device types, not devices",
           "TORCH_CHECK(t.device() == dev,",
           "TORCH_CHECK(t.device().type() == dev.type(),",
           equivalent="only a second device of the same type can show it: cudasim has one, and "
                      "the GPU tests' second-device case needs two GPUs"),
    _binding("b_cluster_cap", "cluster takes any positive size",
           "TORCH_CHECK(cluster >= 0 && cluster <= 16,",
           "TORCH_CHECK(cluster >= 0,"),
    _binding("b_smem_backstop", "the shared-memory backstop takes twice the device's limit",
           "TORCH_CHECK(plan.smem_bytes <= d.smem_optin,",
           "TORCH_CHECK(plan.smem_bytes <= 2 * d.smem_optin,"),
]

SWEEP = ["tests/cuda/test_accuracy_sweep.py"]
SUITE = ["tests/cuda/test_host_binding.py", "tests/cuda/test_cuda_gpu.py",
         "tests/cuda/test_cuda_sim.py"]
# binding.cpp's mutants: its host build (host_binding.py) behind test_cuda_gpu.py (the default
# stand-in there), its refusals included, and against its mirror; with --full, those marked
# "asan" also run test_cuda_sim.py's AddressSanitizer case (the binding instrumented too).
BINDING_TESTS = ["tests/cuda/test_host_binding.py", "tests/cuda/test_cuda_gpu.py"]
ASAN = ["tests/cuda/test_cuda_sim.py::test_gpu_suite_under_address_sanitizer"]


def apply(m: Mutant, csrc: Path) -> None:
    path = csrc / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: its text stands {text.count(m.old)} times in {m.file}")
    path.write_text(text.replace(m.old, m.new))


def _copy_checkout(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def _pytest(tree: Path, files: list[str], env: dict) -> str | None:
    """None if the tests in ``files`` pass in ``tree``, else the first that failed (pytest
    stops there)."""
    run = subprocess.run([sys.executable, "-m", "pytest", *files, "-x", "-q", "-rfE",
                          "-p", "no:cacheprovider"], cwd=tree, env=env, check=False,
                         capture_output=True, text=True)
    if run.returncode == 0:
        return None
    lines = (run.stdout + run.stderr).splitlines()
    return next((ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED", "ERROR"))),
                f"pytest exit code {run.returncode}: {lines[-1] if lines else ''}")


# Per file: (the quick stage's name, its tests, the build it needs), and (--full) the slow
# stage's name and tests, for the mutants marked with it or equivalent.
STAGES = {BINDING: (("binding", BINDING_TESTS, "import host_binding; host_binding.build()"),
                    ("asan", ASAN))}
KERNEL_STAGES = (("sweep", SWEEP, "import simulate; simulate.build()"), ("suite", SUITE))


def run_mutant(m: Mutant, full: bool, work: Path) -> tuple[str, bool]:
    """(what happened, whether that is as the list says)."""
    (quick, quick_tests, build_code), (slow, slow_tests) = STAGES.get(m.file, KERNEL_STAGES)
    tree = work / m.name
    try:
        _copy_checkout(tree)
        apply(m, tree / "csrc")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        build = subprocess.run([sys.executable, "-c", build_code], cwd=tree / "tests" / "cuda",
                               env=env, capture_output=True, text=True, check=False)
        if build.returncode != 0:
            return "does not build", False
        failed = _pytest(tree, quick_tests, env)
        if failed:
            return f"caught by the {quick} tests ({failed})", not m.equivalent
        if m.caught_by == quick and not m.equivalent:
            return f"SURVIVED the {quick} tests", False
        if not full:
            return (f"survived the {quick} tests (equivalent)" if m.equivalent
                    else f"survived the {quick} tests (run --full)"), True
        failed = _pytest(tree, slow_tests, env)
        if failed:
            return f"caught by the {slow} tests ({failed})", not m.equivalent
        return ("survived (equivalent)", True) if m.equivalent else ("SURVIVED", False)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def main(argv: list[str]) -> int:
    full = "--full" in argv
    names = [a for a in argv if a != "--full"]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"no mutant named {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not names or m.name in names]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="fused_rnn_mutants_") as work:
        for m in chosen:
            outcome, expected = run_mutant(m, full, Path(work))
            bad += not expected
            note = f" ({m.equivalent})" if m.equivalent else ""
            print(f"{m.name}: {outcome}{'' if expected else ' <- not as listed'}: {m.what}{note}",
                  flush=True)
    print(f"{len(chosen)} mutants, {bad} not as listed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
