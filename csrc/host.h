// The torch side of the CUDA C++ backend, included by each op's glue (<op>_ops.cpp): the
// registration namespace and dispatch key, argument checks, output allocation helpers, and what the
// glue hands a kernel file's launch functions (dtype, stream, SM count, shared-memory limit).
// Compiled once per file by the host compiler; the kernel files (<op>.cu) never include it.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "launch.h"

// Where each op registers its ops (TORCH_LIBRARY_FRAGMENT, so every glue file carries its own
// schemas and its CUDA and Meta implementations): torch.ops.mmkernels.cuda_* on CUDA tensors, or,
// built for the CPU emulator (MMK_EMULATE), torch.ops.mmkernels_emu.cuda_* on CPU tensors.
#ifdef MMK_EMULATE
#define MMK_NAMESPACE mmkernels_emu
#define MMK_DISPATCH_KEY CPU
#define MMK_DEVICE_GUARD(DEVICE) (void)0
#define MMK_DEVICE_TYPE at::kCPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define MMK_NAMESPACE mmkernels
#define MMK_DISPATCH_KEY CUDA
#define MMK_DEVICE_GUARD(DEVICE) c10::cuda::CUDAGuard mmk_device_guard_(DEVICE)
#define MMK_DEVICE_TYPE at::kCUDA
#endif

namespace mmk {

// Meta (shape-only) implementations: what torch.compile's fake tensors run when the `cuda` backend
// is selected. An empty tensor of t's (symbolic) shape and options.
inline at::Tensor meta_like(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

// Can N = 16 / elem_size consecutive elements move as one 16-byte access everywhere? Every
// pointer must be 16-byte aligned and every element count / stride a multiple of N. Kernels are
// instantiated for the full width and for scalar access only (compile time stays small).
inline bool vec16_ok(int64_t elem_size, std::initializer_list<const void*> ptrs,
                     std::initializer_list<int64_t> counts) {
  const int64_t n = 16 / elem_size;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t c : counts)
    if (c % n != 0) return false;
  return true;
}

// The kernels' dtype for a tensor's; anything but the three I/O dtypes is refused, naming `op`.
inline DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", t);
  }
}

#ifdef MMK_EMULATE
inline int num_sms() { return 4; }  // a small machine: exercises the split and multi-block paths
inline int64_t smem_optin() { return 227 * 1024; }
inline Stream stream() { return nullptr; }
inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": the emulator reported error ", err);
}
#else
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int64_t smem_optin() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
inline Stream stream() { return static_cast<Stream>(at::cuda::getCurrentCUDAStream().stream()); }
// The error a launch function returned: raised as PyTorch's CUDA errors are.
inline void check_launch(int err, const char* op) {
  (void)op;
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}
#endif

// Dynamic shared memory within this GPU's per-block limit (checked before the launch).
inline void check_smem(size_t bytes, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(bytes) <= smem_optin(), op, ": needs ", bytes, " bytes of shared memory per block");
}

}  // namespace mmk
