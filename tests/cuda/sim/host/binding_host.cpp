// csrc/binding.cpp itself, compiled for cudasim (tests/cuda/host_binding.py): torch's CPU
// headers, cudasim's CUDA headers (-I sim/include) and this directory's stand-ins for the two
// c10 CUDA headers the binding includes, linked to the cudasim library of the kernels. CPU
// tensors stand for the simulated device's; two names change for that, and nothing else:
//   * is_cuda reads is_cpu: the binding's "inputs must be CUDA tensors" check then refuses
//     anything but a CPU tensor, as on a GPU it refuses anything but a CUDA one;
//   * the CPU device's index (-1) is the simulated device 0 for cudaDeviceGetAttribute.
// torch/extension.h comes first, so the renames reach binding.cpp's own text only (its
// include of torch/extension.h is then a no-op). After it, one test hook, which adds nothing
// to the binding: see fused_rnn_host_install_oom_gemm.
#include <torch/extension.h>

#include <cuda_runtime.h>  // cudasim's

#define is_cuda is_cpu

inline cudaError_t host_device_attribute(int* value, cudaDeviceAttr attr, int device) {
  return cudaDeviceGetAttribute(value, attr, device < 0 ? 0 : device);
}
#define cudaDeviceGetAttribute host_device_attribute

#include "binding.cpp"  // from -I csrc (or a mutated copy)

// Test hook, called through ctypes (host_binding.install_oom_gemm), never at load, so that the
// modules of several builds can share a process: a CPU kernel for aten::mm.dtype_out (the
// per-step path's 16-bit GEMM) that fails as the CUDA caching allocator does when memory runs
// out, a c10::OutOfMemoryError, which a Python kernel cannot raise.
namespace {
at::Tensor& oom_mm_dtype_out(const at::Tensor&, const at::Tensor&, c10::ScalarType,
                             at::Tensor& out) {
  TORCH_CHECK_WITH(OutOfMemoryError, false,
                   "CUDA out of memory. Tried to allocate 20.00 GiB (host_binding's stand-in)");
  return out;
}
}  // namespace

extern "C" void fused_rnn_host_install_oom_gemm() {
  static torch::Library lib(torch::Library::IMPL, "aten", c10::DispatchKey::CPU, __FILE__,
                            __LINE__);
  lib.impl("mm.dtype_out", oom_mm_dtype_out);
}
