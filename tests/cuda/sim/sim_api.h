// cudasim's configuration and the C entry points tests/cuda/simulate.py calls through ctypes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cudasim {

enum Order { kOrderAscending = 0, kOrderDescending = 1, kOrderShuffle = 2 };

struct Config {
  int sms = 4;                       // streaming multiprocessors (grid limit of the plans)
  int smem_optin = 227 * 1024;       // opt-in dynamic shared memory per block (H100)
  int smem_per_sm = 228 * 1024;      // shared memory per SM, for occupancy (H100)
  int order = kOrderAscending;       // which thread runs first between two barriers
  uint64_t seed = 0;                 // for kOrderShuffle
  bool cp_async_early = false;       // a cp.async lands when issued (else when waited for)
  int max_clusters = -1;             // clusters that fit at once (< 0: by occupancy)
  int ptx_version = 90;              // cudaFuncGetAttributes' ptxVersion (the build's arch)
};

void configure(const Config& c);
const Config& config();
const std::string& last_message();  // why the last launch failed ("" if it did not)
// Why a cluster launch that returned success failed inside ("" if none did since the last
// call); cleared by the call. (On a GPU that failure comes back at the next synchronization.)
std::string kernel_failure();
// Leaves `code` pending in this thread's cudaGetLastError, as a failed runtime call of someone
// else's (torch's, say) would.
void set_last_error(int code);
// Calls a GPU may refuse even where the queries before them said yes (another process holding
// SMs, a device without non-portable cluster sizes), refused here from now on (0: none), so
// that csrc's paths for those refusals run: each refused call fails with an error, which it
// also leaves pending in cudaGetLastError, as a GPU does.
enum Refuse : unsigned {
  kRefuseNonPortableClusters = 1,  // cudaFuncSetAttribute(NonPortableClusterSizeAllowed)
  kRefuseClusterOccupancy = 2,     // cudaOccupancyMaxActiveClusters
  kRefuseClusterLaunches = 4,      // cudaLaunchKernelExC with a cluster dimension
};
void refuse(unsigned calls);
// Unmaps the simulated threads' stacks (the next launch maps what it needs again); false, and
// nothing done, during a launch.
bool release_stacks();

// The kernel translation units register each kernel at load time: how to call it with its
// args, and how to describe its launches (cudasim.h register_kernel, Describe).

// The stream c10 reports current to the binding's host build (cudasim.h current_stream) in
// this thread, as an integer: 0 is the legacy default stream, anything else names one. Then how many launches
// so far named it (on) and named another (off), counted per launch API call that ran.
void set_current_stream(uintptr_t stream);
void stream_launches(long long* on, long long* off);
// The calling thread's current device (cudasim.h set_current_device): 0, the simulated one,
// or another, on which every call that acts on the current device fails.
void set_current_device(int device);

// The last described launch (empty before the first): kernels.cpp describe's fields, then
// the launch's number (1, 2, ... in this process).
const std::vector<int>& last_launch();

// Registers the kernel behind a launch_forward/launch_backward instantiation.
template <typename Params>
void invoke(const void* func, void** args) {
  reinterpret_cast<void (*)(Params)>(const_cast<void*>(func))(*static_cast<const Params*>(args[0]));
}

}  // namespace cudasim
