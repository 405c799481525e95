// gated_sum: out[r, :] = sum_m softmax_m(z[r, m, :])[m] * tanh(h_pre[r, m, :]) over the present
// modalities (mask), forward and backward, one launch each.
//
// Layout: h_pre [R, M, H] with unit stride along H and any row / modality strides; z either
// [R, M, H] (feature gates) or [R, M] (modality gates: read with an H stride of 0); mask [R, M]
// bool or none. Absent modalities are never loaded (their weight is exactly 0, NaN there is
// harmless); a row with nothing present gives 0 and zero gradients. fp32 math.
// Forward: one thread per (row, VEC features), 16-byte loads, two passes over the modalities
// (largest present logit, then exp / tanh / sum; the second reads hit L1).
// Backward: one warp per row: dh_m = dy g_m (1 - t_m^2); feature gates dz_m = g_m dy (t_m - out);
// modality gates sum that over H with a warp reduction (lane m keeps modality m's sum): no
// atomics, deterministic.
#include "device.cuh"
#include "gated_sum.h"

namespace mmk::gs {
namespace {

template <typename T, int VEC, bool FEATURE>
__device__ __forceinline__ void load_z(const Args& a, int64_t r, int m, int k, float (&z)[VEC]) {
  const T* zp = static_cast<const T*>(a.z) + r * a.szr + m * a.szm;
  if (FEATURE) {
    load_f<T, VEC>(zp + k, z);
  } else {
    const float v = to_f(*zp);
#pragma unroll
    for (int i = 0; i < VEC; ++i) z[i] = v;
  }
}

__device__ __forceinline__ bool present(const Args& a, int64_t r, int m) {
  return a.mask == nullptr || a.mask[r * a.smr + m * a.smm];
}

// Softmax statistics over the present modalities at (row r, columns k..k+VEC): the largest logit
// (0 when nothing is present), the denominator, and sum_m e_m * tanh(h_m) (un-normalised output).
// Two passes; the second's loads of z hit L1.
template <typename T, int VEC, bool FEATURE>
__device__ __forceinline__ void softmax_tanh_sum(const Args& a, int64_t r, int k, float (&zmax)[VEC],
                                                 float (&den)[VEC], float (&acc)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) { zmax[i] = -INFINITY; den[i] = 0.f; acc[i] = 0.f; }
  for (int m = 0; m < a.m; ++m) {
    if (!present(a, r, m)) continue;
    float z[VEC];
    load_z<T, VEC, FEATURE>(a, r, m, k, z);
#pragma unroll
    for (int i = 0; i < VEC; ++i) zmax[i] = fmaxf(zmax[i], z[i]);
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) zmax[i] = zmax[i] == -INFINITY ? 0.f : zmax[i];
  for (int m = 0; m < a.m; ++m) {
    if (!present(a, r, m)) continue;
    float z[VEC], h[VEC];
    load_z<T, VEC, FEATURE>(a, r, m, k, z);
    load_f<T, VEC>(static_cast<const T*>(a.h) + r * a.shr + m * a.shm + k, h);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float e = __expf(z[i] - zmax[i]);
      den[i] += e;
      acc[i] += e * tanh_f<T>(h[i]);
    }
  }
}

template <typename T, int VEC, bool FEATURE>
__global__ void __launch_bounds__(256) gated_sum_fwd_kernel(const __grid_constant__ Args a) {
  const int per_row = (a.h_dim + VEC - 1) / VEC;
  const int64_t total = a.rows * per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / per_row;
    const int k = static_cast<int>(idx - r * per_row) * VEC;
    float zmax[VEC], den[VEC], acc[VEC];
    softmax_tanh_sum<T, VEC, FEATURE>(a, r, k, zmax, den, acc);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = den[i] > 0.f ? acc[i] / den[i] : 0.f;
    store_f<T, VEC>(static_cast<T*>(a.out) + r * a.h_dim + k, acc);
  }
}

template <typename T, int VEC, bool FEATURE>
__global__ void __launch_bounds__(kWarps * 32) gated_sum_bwd_kernel(const __grid_constant__ Args a) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= a.rows) return;
  float dz_row = 0.f;  // modality gates: lane m sums dz[r, m]
  // every lane runs the same iterations (the warp reduction below needs all 32); lanes past H idle
  for (int k0 = 0; k0 < a.h_dim; k0 += 32 * VEC) {
    const int k = k0 + lane * VEC;
    const bool on = k < a.h_dim;
    float zmax[VEC], den[VEC], out[VEC], dy[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) { zmax[i] = 0.f; den[i] = 0.f; out[i] = 0.f; dy[i] = 0.f; }
    if (on) softmax_tanh_sum<T, VEC, FEATURE>(a, r, k, zmax, den, out);
    float inv[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      inv[i] = den[i] > 0.f ? 1.f / den[i] : 0.f;
      out[i] *= inv[i];
    }
    if (on) load_f<T, VEC>(static_cast<const T*>(a.dy) + r * a.sdy + k, dy);
    for (int m = 0; m < a.m; ++m) {
      float dh[VEC], dz[VEC];
      float part = 0.f;
      if (on && present(a, r, m)) {
        float z[VEC], h[VEC];
        load_z<T, VEC, FEATURE>(a, r, m, k, z);
        load_f<T, VEC>(static_cast<const T*>(a.h) + r * a.shr + m * a.shm + k, h);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = __expf(z[i] - zmax[i]) * inv[i];
          const float t = tanh_f<T>(h[i]);
          dh[i] = dy[i] * g * (1.f - t * t);
          dz[i] = g * dy[i] * (t - out[i]);
          part += dz[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) { dh[i] = 0.f; dz[i] = 0.f; }
      }
      const int64_t o = (r * a.m + m) * a.h_dim + k;
      if (on) store_f<T, VEC>(static_cast<T*>(a.out) + o, dh);
      if (FEATURE) {
        if (on) store_f<T, VEC>(static_cast<T*>(a.dz) + o, dz);
      } else {
        part = warp_sum(part);
        if (lane == m) dz_row += part;
      }
    }
  }
  if (!FEATURE && lane < a.m) static_cast<T*>(a.dz)[r * a.m + lane] = from_f<T>(dz_row);
}

}  // namespace

int launch_fwd(DType dtype, bool vec, bool feature, const Args& a, int sms, Stream stream) {
  MMK_DISPATCH_DTYPE(dtype, [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      const int64_t items = a.rows * ((a.h_dim + VEC - 1) / VEC);
      const int64_t blocks = lmin((items + 255) / 256, int64_t(sms) * 16);
      if (feature)
        MMK_LAUNCH((gated_sum_fwd_kernel<scalar_t, VEC, true>), blocks, 256, 0, stream, a);
      else
        MMK_LAUNCH((gated_sum_fwd_kernel<scalar_t, VEC, false>), blocks, 256, 0, stream, a);
    });
  });
  return launch_error();
}

int launch_bwd(DType dtype, bool vec, bool feature, const Args& a, Stream stream) {
  const int64_t blocks = (a.rows + kWarps - 1) / kWarps;
  MMK_DISPATCH_DTYPE(dtype, [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      if (feature)
        MMK_LAUNCH((gated_sum_bwd_kernel<scalar_t, VEC, true>), blocks, kWarps * 32, 0, stream, a);
      else
        MMK_LAUNCH((gated_sum_bwd_kernel<scalar_t, VEC, false>), blocks, kWarps * 32, 0, stream, a);
    });
  });
  return launch_error();
}

}  // namespace mmk::gs
