// cudasim's host build of csrc/binding.cpp (tests/cuda/host_binding.py): c10's CUDA device guard.
// The host build's tensors are CPU tensors standing for the simulated device's (device 0). The
// guard checks that it is handed what the binding would hand it on a GPU (the tensors' device,
// or device 0 for kernel_image), makes device 0 current for its lifetime, and restores the
// caller's current device after, as c10's does: HostBinding calls the binding with another
// device current (cudasim.h set_current_device), so a launch or device query outside a guard
// fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>  // cudasim's

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "cudasim host build: a guard for ", device.str(),
                ", not the CPU tensors' device");
    enter();
  }
  explicit CUDAGuard(c10::DeviceIndex index) {
    TORCH_CHECK(index == 0, "cudasim host build: a guard for device ", std::to_string(index),
                "; the simulated device is 0");
    enter();
  }
  ~CUDAGuard() { cudasim::set_current_device(previous_); }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;

 private:
  void enter() {
    TORCH_CHECK(cudaGetDevice(&previous_) == cudaSuccess && cudaSetDevice(0) == cudaSuccess,
                "cudasim host build: the guard could not make device 0 current");
  }
  int previous_ = 0;
};

}  // namespace c10::cuda
