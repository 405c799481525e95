// The device side of the CUDA C++ kernels, included by the kernel files (<op>.cu): fp32 conversion,
// 16-byte vector loads/stores, warp reductions, the launch macro and the dtype / vector-width
// dispatch of the launch functions. No torch headers: nvcc parses a kernel file once per target
// (six SASS targets and a PTX), so what it includes is paid seven times; the torch glue of each op
// (<op>_ops.cpp) is compiled once, by the host compiler.
#pragma once

#include <cstddef>
#include <cstdint>

#include "launch.h"

#ifdef MMK_EMULATE
// Built by g++ for the CPU emulator (tests): every CUDA thread is a host thread (csrc/emu/simt.h).
#include "emu/simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The few places where a kernel file touches the CUDA runtime, so the emulator can stand in.
#define MMK_LAUNCH(KERNEL, GRID, BLOCK, SMEM, STREAM, ...) \
  KERNEL<<<GRID, BLOCK, SMEM, static_cast<cudaStream_t>(STREAM)>>>(__VA_ARGS__)
#define MMK_DYNAMIC_SMEM(TYPE, NAME) extern __shared__ __align__(16) TYPE NAME[]
#endif

namespace mmk {

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

// ---- launch side (host code of the kernel files) ------------------------------------------------

// Allow `bytes` of dynamic shared memory for `kernel` (more than the default 48 KB needs opting
// in); the glue has checked `bytes` against the GPU's limit. 0 or the CUDA error.
template <typename K>
int set_dynamic_smem(K kernel, size_t bytes) {
#ifdef MMK_EMULATE
  (void)kernel;
  (void)bytes;
  return 0;
#else
  if (bytes <= 48 * 1024) return 0;
  return static_cast<int>(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes)));
#endif
}

// The error of the launches just queued (0: none).
inline int launch_error() {
#ifdef MMK_EMULATE
  return 0;
#else
  return static_cast<int>(cudaGetLastError());
#endif
}

}  // namespace mmk

// Dispatch over the three I/O dtypes: `scalar_t` is float, __half or __nv_bfloat16 in the body.
#define MMK_DISPATCH_DTYPE(DTYPE, ...)                                        \
  [&] {                                                                       \
    switch (DTYPE) {                                                          \
      case ::mmk::DType::F16: { using scalar_t = __half; return __VA_ARGS__(); }          \
      case ::mmk::DType::BF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }  \
      default: { using scalar_t = float; return __VA_ARGS__(); }              \
    }                                                                         \
  }()

// `VEC` = 16 / sizeof(scalar_t) (one 16-byte access) when OK, else 1, as a constexpr in the body.
#define MMK_DISPATCH_VEC(OK, ...)                                                      \
  [&] {                                                                               \
    if (OK) { constexpr int VEC = 16 / sizeof(scalar_t); return __VA_ARGS__(); }      \
    constexpr int VEC = 1;                                                            \
    return __VA_ARGS__();                                                             \
  }()
