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
#include "common.cuh"

namespace mmk {
namespace {

constexpr int kMaxM = 32;
constexpr int kWarps = 8;

struct Args {
  const void* h;
  const void* z;
  const bool* mask;
  const void* dy;     // backward
  void* out;          // forward: out [R, H]; backward: dh [R, M, H] (contiguous)
  void* dz;           // backward: dz, contiguous, shaped as z
  int64_t rows, shr, shm, szr, szm, smr, smm, sdy;
  int m, h_dim;
};

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

// h_pre [..., M, H] -> [R, M, H] view with unit H stride (a copy only when needed)
at::Tensor as3d(const at::Tensor& t, int64_t rows, int64_t m, int64_t h) {
  at::Tensor r = t.reshape({rows, m, h});
  if (h > 1 && r.stride(2) != 1) r = r.contiguous();
  return r;
}

Args make_args(const at::Tensor& h_pre, const at::Tensor& z, const std::optional<at::Tensor>& mask,
               at::Tensor& h3, at::Tensor& z3, at::Tensor& m2, bool& feature, const char* op) {
  TORCH_CHECK(h_pre.device().type() == MMK_DEVICE_TYPE && h_pre.dim() >= 2, op, ": h_pre must be a CUDA tensor [..., M, H]");
  const int64_t m = h_pre.size(-2), hd = h_pre.size(-1);
  TORCH_CHECK(m >= 1 && m <= kMaxM, op, ": M must be in [1, ", kMaxM, "]");
  TORCH_CHECK(z.scalar_type() == h_pre.scalar_type(), op, ": z must have the dtype of h_pre");
  feature = z.dim() == h_pre.dim();
  const int64_t rows = hd > 0 ? h_pre.numel() / (m * hd) : [&] {
    int64_t r = 1; for (int64_t i = 0; i + 2 < h_pre.dim(); ++i) r *= h_pre.size(i); return r; }();
  h3 = as3d(h_pre, rows, m, hd);
  Args a{};
  a.rows = rows;
  a.m = static_cast<int>(m);
  a.h_dim = static_cast<int>(hd);
  TORCH_CHECK(hd < (int64_t(1) << 31), op, ": H must be < 2^31");
  a.h = h3.data_ptr();
  a.shr = rows > 1 ? h3.stride(0) : m * hd;
  a.shm = h3.stride(1);
  if (feature) {
    z3 = as3d(z, rows, m, hd);
    a.szr = rows > 1 ? z3.stride(0) : m * hd;
    a.szm = z3.stride(1);
  } else {
    z3 = z.reshape({rows, m});
    a.szr = rows > 1 ? z3.stride(0) : m;
    a.szm = z3.stride(1);
  }
  a.z = z3.data_ptr();
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": modality_mask must be bool");
    m2 = mask->reshape({rows, m});
    a.mask = m2.data_ptr<bool>();
    a.smr = rows > 1 ? m2.stride(0) : m;
    a.smm = m2.stride(1);
  }
  return a;
}

}  // namespace

at::Tensor gated_sum_fwd_cuda(const at::Tensor& h_pre, const at::Tensor& z,
                              const std::optional<at::Tensor>& modality_mask) {
  at::Tensor h3, z3, m2;
  bool feature;
  Args a = make_args(h_pre, z, modality_mask, h3, z3, m2, feature, "cuda_gated_sum_fwd");
  MMK_DEVICE_GUARD(h_pre.device());
  std::vector<int64_t> shape(h_pre.sizes().begin(), h_pre.sizes().end() - 2);
  shape.push_back(h_pre.size(-1));
  at::Tensor out = at::empty(shape, h_pre.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  a.out = out.data_ptr();
  const int64_t es = h_pre.element_size();
  const bool vec = vec16_ok(es, {a.h, a.out, feature ? a.z : nullptr},
                            {a.h_dim, a.shr, a.shm, feature ? a.szr : 0, feature ? a.szm : 0});
  MMK_DISPATCH_FLOATS(h_pre.scalar_type(), "cuda_gated_sum_fwd", [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      const int64_t items = a.rows * ((a.h_dim + VEC - 1) / VEC);
      const int64_t blocks = std::min<int64_t>((items + 255) / 256, int64_t(num_sms()) * 16);
      if (feature)
        MMK_LAUNCH((gated_sum_fwd_kernel<scalar_t, VEC, true>), blocks, 256, 0, a);
      else
        MMK_LAUNCH((gated_sum_fwd_kernel<scalar_t, VEC, false>), blocks, 256, 0, a);
    });
  });
  return out;
}

std::vector<at::Tensor> gated_sum_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& h_pre,
                                           const at::Tensor& z, const std::optional<at::Tensor>& modality_mask) {
  at::Tensor h3, z3, m2;
  bool feature;
  Args a = make_args(h_pre, z, modality_mask, h3, z3, m2, feature, "cuda_gated_sum_bwd");
  MMK_DEVICE_GUARD(h_pre.device());
  at::Tensor dh = at::empty(h_pre.sizes(), h_pre.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dz = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.rows == 0 || a.h_dim == 0) {
    dh.zero_();
    dz.zero_();
    return {dh, dz};
  }
  TORCH_CHECK(grad_out.scalar_type() == h_pre.scalar_type() && grad_out.size(-1) == a.h_dim,
              "cuda_gated_sum_bwd: grad_out must be [..., H] in the dtype of h_pre");
  at::Tensor dy2 = grad_out.reshape({a.rows, a.h_dim});
  if (a.h_dim > 1 && dy2.stride(1) != 1) dy2 = dy2.contiguous();
  a.dy = dy2.data_ptr();
  a.sdy = a.rows > 1 ? dy2.stride(0) : a.h_dim;
  a.out = dh.data_ptr();
  a.dz = dz.data_ptr();
  const int64_t es = h_pre.element_size();
  const bool vec = vec16_ok(es, {a.h, a.dy, a.out, feature ? a.z : nullptr, feature ? a.dz : nullptr},
                            {a.h_dim, a.shr, a.shm, a.sdy, feature ? a.szr : 0, feature ? a.szm : 0});
  const int64_t blocks = (a.rows + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "cuda_gated_sum_bwd: too many rows");
  MMK_DISPATCH_FLOATS(h_pre.scalar_type(), "cuda_gated_sum_bwd", [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      if (feature)
        MMK_LAUNCH((gated_sum_bwd_kernel<scalar_t, VEC, true>), blocks, kWarps * 32, 0, a);
      else
        MMK_LAUNCH((gated_sum_bwd_kernel<scalar_t, VEC, false>), blocks, kWarps * 32, 0, a);
    });
  });
  return {dh, dz};
}

}  // namespace mmk

// ---- registration: schema, CUDA (or emulator) and Meta implementations ---------------------------

namespace {

at::Tensor gated_sum_fwd_meta(const at::Tensor& h_pre, const at::Tensor&, const std::optional<at::Tensor>&) {
  std::vector<c10::SymInt> shape(h_pre.sym_sizes().begin(), h_pre.sym_sizes().end() - 2);
  shape.push_back(h_pre.sym_size(-1));
  return at::empty_symint(shape, h_pre.options());
}

std::vector<at::Tensor> gated_sum_bwd_meta(const at::Tensor&, const at::Tensor& h_pre, const at::Tensor& z,
                                           const std::optional<at::Tensor>&) {
  return {mmk::meta_like(h_pre), mmk::meta_like(z)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(MMK_NAMESPACE, m) {
  m.def("cuda_gated_sum_fwd(Tensor h_pre, Tensor z, Tensor? modality_mask) -> Tensor");
  m.def("cuda_gated_sum_bwd(Tensor grad_out, Tensor h_pre, Tensor z, Tensor? modality_mask) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(MMK_NAMESPACE, MMK_DISPATCH_KEY, m) {
  m.impl("cuda_gated_sum_fwd", &mmk::gated_sum_fwd_cuda);
  m.impl("cuda_gated_sum_bwd", &mmk::gated_sum_bwd_cuda);
}
TORCH_LIBRARY_IMPL(MMK_NAMESPACE, Meta, m) {
  m.impl("cuda_gated_sum_fwd", &gated_sum_fwd_meta);
  m.impl("cuda_gated_sum_bwd", &gated_sum_bwd_meta);
}
