// cudasim's host build of csrc/binding.cpp (tests/cuda/host_binding.py): c10's current stream
// and device count. The current stream is whichever the test named (cudasim.h current_stream);
// launches run to their end before the launch call returns, on any stream, and cudasim counts
// those that named another.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime.h>  // cudasim's

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return stream_; }
  cudaStream_t stream_;
};

// The binding asks for its tensors' device's stream; CPU tensors have index -1.
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex index = -1) {
  TORCH_CHECK(index == -1 || index == 0, "cudasim host build: no device ", std::to_string(index));
  return {cudasim::current_stream()};
}

inline c10::DeviceIndex device_count() { return 1; }

}  // namespace c10::cuda
