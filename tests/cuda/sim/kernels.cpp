// The unchanged kernels of csrc/, compiled for cudasim, and their registration. Built twice:
// as is (forward) and with -DFRNN_SIM_BACKWARD (backward), so the two compile in parallel.
#ifdef FRNN_SIM_BACKWARD
#include "rnn_backward.cu"  // from -I csrc (or a mutated copy)
#define FRNN_SIM_KERNEL rnn_backward_kernel
#define FRNN_SIM_STEP_KERNEL rnn_backward_step_kernel
#define FRNN_SIM_PARAMS BwdParams
#else
#include "rnn_forward.cu"
#define FRNN_SIM_KERNEL rnn_forward_kernel
#define FRNN_SIM_STEP_KERNEL rnn_forward_step_kernel
#define FRNN_SIM_PARAMS FwdParams
#endif
#include "sim_api.h"

namespace {
using namespace fused_rnn;

// A persistent launch as its params give it: the math (the kernel's), the plan's fields in
// declaration order, the cluster mode, stage_copy, tile_block, point_batch and frag_loads
// (simulate.py LAUNCH_FIELDS).
template <Math M>
std::vector<int> describe(void** args) {
  const FRNN_SIM_PARAMS& p = *static_cast<const FRNN_SIM_PARAMS*>(args[0]);
  const Plan& l = p.plan;
  return {static_cast<int>(M), l.units, l.blocks, l.m_rows, l.m_pad, l.k, l.k_pad, l.ldw,
          l.slots, l.slot_floats, l.w_bytes, l.smem_bytes, l.groups, l.group_blocks,
          l.stage_rows, l.stage_k, l.stage_ld, l.parts, l.k_part, l.part_ld, p.cluster,
          p.stage_copy, p.tile_block, p.point_batch, p.frag_loads};
}

template <Cell C>
void register_cell() {
  using detail::FRNN_SIM_KERNEL;
  auto add = [](auto kernel, cudasim::Describe d) {
    cudasim::register_kernel(reinterpret_cast<const void*>(kernel),
                             cudasim::invoke<FRNN_SIM_PARAMS>, d);
  };
  add(FRNN_SIM_KERNEL<C, __nv_bfloat16, Math::kWmma16, false>, describe<Math::kWmma16>);
  add(FRNN_SIM_KERNEL<C, __half, Math::kWmma16, false>, describe<Math::kWmma16>);
  add(FRNN_SIM_KERNEL<C, float, Math::kTf32, false>, describe<Math::kTf32>);
  add(FRNN_SIM_KERNEL<C, float, Math::kFma, false>, describe<Math::kFma>);
  // the tagged exchange's (fused_rnn.h tagged_exchange; 16-bit storage)
  add(FRNN_SIM_KERNEL<C, __nv_bfloat16, Math::kWmma16, true>, describe<Math::kWmma16>);
  add(FRNN_SIM_KERNEL<C, __half, Math::kWmma16, true>, describe<Math::kWmma16>);
  using detail::FRNN_SIM_STEP_KERNEL;  // the per-step path's launches (fused_rnn.h StepArgs)
  auto add_step = [](auto kernel) {
    cudasim::register_kernel(reinterpret_cast<const void*>(kernel),
                             cudasim::invoke<StepArgs<FRNN_SIM_PARAMS>>);
  };
  add_step(FRNN_SIM_STEP_KERNEL<C, __nv_bfloat16>);
  add_step(FRNN_SIM_STEP_KERNEL<C, __half>);
  add_step(FRNN_SIM_STEP_KERNEL<C, float>);
}

const bool registered = [] {
  register_cell<Cell::kLSTM>();
  register_cell<Cell::kGRU>();
  register_cell<Cell::kRNNTanh>();
  register_cell<Cell::kRNNRelu>();
  return true;
}();
}  // namespace
