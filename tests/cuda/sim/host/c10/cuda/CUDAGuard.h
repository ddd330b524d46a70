// cudasim's host build of csrc/binding.cpp (tests/cuda/host_binding.py): c10's CUDA device guard.
// The host build's tensors are CPU tensors standing for the simulated device's (device 0), so
// there is nothing to switch; the guard checks that it is handed what the binding would have
// on a GPU: the tensors' device, or device 0 (kernel_image).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "cudasim host build: a guard for ", device.str(),
                ", not the CPU tensors' device");
  }
  explicit CUDAGuard(c10::DeviceIndex index) {
    TORCH_CHECK(index == 0, "cudasim host build: a guard for device ", std::to_string(index),
                "; the simulated device is 0");
  }
};

}  // namespace c10::cuda
