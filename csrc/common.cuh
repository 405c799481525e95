// Shared device helpers of the mmkernels CUDA C++ kernels: dtype dispatch, fp32 conversion,
// 16-byte vector loads/stores, warp reductions, and the launch-configuration helpers.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

// Where each .cu registers its ops (TORCH_LIBRARY_FRAGMENT, so every kernel file carries its own
// schemas and its CUDA and Meta implementations): torch.ops.mmkernels.cuda_* on CUDA tensors, or,
// built for the CPU emulator (MMK_EMULATE), torch.ops.mmkernels_emu.cuda_* on CPU tensors.
#ifdef MMK_EMULATE
#define MMK_NAMESPACE mmkernels_emu
#define MMK_DISPATCH_KEY CPU
#else
#define MMK_NAMESPACE mmkernels
#define MMK_DISPATCH_KEY CUDA
#endif

#ifdef MMK_EMULATE
// Built by g++ for the CPU emulator (tests): every CUDA thread is a host thread (csrc/emu/simt.h).
#include "emu/simt.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The few places where the host code touches the CUDA runtime, so the emulator can stand in.
#define MMK_LAUNCH(KERNEL, GRID, BLOCK, SMEM, ...)                                               \
  do {                                                                                        \
    KERNEL<<<GRID, BLOCK, SMEM, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);             \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                           \
  } while (0)
#define MMK_DYNAMIC_SMEM(TYPE, NAME) extern __shared__ __align__(16) TYPE NAME[]
#define MMK_DEVICE_GUARD(DEVICE) c10::cuda::CUDAGuard mmk_device_guard_(DEVICE)
#define MMK_DEVICE_TYPE at::kCUDA
#endif

namespace mmk {

// Meta (shape-only) implementations: what torch.compile's fake tensors run when the `cuda` backend
// is selected. An empty tensor of t's (symbolic) shape and options.
inline at::Tensor meta_like(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }


// fp32 <-> storage type. Accumulation is always fp32.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements moved as one access: 16 bytes when N * sizeof(T) == 16.
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void to_f(const Vec<T, N>& r, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f(r.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void load_f(const T* __restrict__ p, float (&out)[N]) {
  to_f(load_vec<T, N>(p), out);
}

template <typename T, int N>
__device__ __forceinline__ void store_f(T* __restrict__ p, const float (&in)[N]) {
  Vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = r;
}

__host__ __device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// tanh in fp32: the hardware approximation (rel. error ~2^-11) is enough for fp16/bf16 outputs;
// fp32 outputs get the accurate libdevice tanhf.
template <typename T> __device__ __forceinline__ float tanh_f(float x) { return tanhf(x); }
#if !defined(MMK_EMULATE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
template <> __device__ __forceinline__ float tanh_f<__half>(float x) {
  float y; asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
template <> __device__ __forceinline__ float tanh_f<__nv_bfloat16>(float x) {
  float y; asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
#endif

// ---- host side ----------------------------------------------------------------------------------

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

#ifndef MMK_EMULATE
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Allow `bytes` of dynamic shared memory for `kernel` (more than the default 48 KB needs opting in).
template <typename K>
void set_dynamic_smem(K kernel, size_t bytes, const char* op) {
  TORCH_CHECK(bytes <= static_cast<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin), op,
              ": needs ", bytes, " bytes of shared memory per block");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}
#endif

}  // namespace mmk

// Dispatch over the three I/O dtypes: `scalar_t` is float, __half or __nv_bfloat16 in the body.
#define MMK_DISPATCH_FLOATS(DTYPE, NAME, ...)                                                  \
  [&] {                                                                                       \
    switch (DTYPE) {                                                                          \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                      \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                      \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }           \
      default: TORCH_CHECK(false, NAME ": expected float32, float16 or bfloat16, got ", DTYPE); \
    }                                                                                         \
  }()

// `VEC` = 16 / sizeof(scalar_t) (one 16-byte access) when OK, else 1, as a constexpr in the body.
#define MMK_DISPATCH_VEC(OK, ...)                                                      \
  [&] {                                                                               \
    if (OK) { constexpr int VEC = 16 / sizeof(scalar_t); return __VA_ARGS__(); }      \
    constexpr int VEC = 1;                                                            \
    return __VA_ARGS__();                                                             \
  }()
