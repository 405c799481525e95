// gated_sum's torch glue: argument checks, outputs, the launch (gated_sum.cu) and the op
// registration (schema, CUDA or emulator, Meta).
#include "host.h"
#include "gated_sum.h"

namespace mmk {
namespace {

using gs::Args;
using gs::kMaxM;

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
  const char* op = "cuda_gated_sum_fwd";
  at::Tensor h3, z3, m2;
  bool feature;
  Args a = make_args(h_pre, z, modality_mask, h3, z3, m2, feature, op);
  const DType dtype = dtype_of(h_pre.scalar_type(), op);
  MMK_DEVICE_GUARD(h_pre.device());
  std::vector<int64_t> shape(h_pre.sizes().begin(), h_pre.sizes().end() - 2);
  shape.push_back(h_pre.size(-1));
  at::Tensor out = at::empty(shape, h_pre.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  a.out = out.data_ptr();
  const int64_t es = h_pre.element_size();
  const bool vec = vec16_ok(es, {a.h, a.out, feature ? a.z : nullptr},
                            {a.h_dim, a.shr, a.shm, feature ? a.szr : 0, feature ? a.szm : 0});
  check_launch(gs::launch_fwd(dtype, vec, feature, a, num_sms(), stream()), op);
  return out;
}

std::vector<at::Tensor> gated_sum_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& h_pre,
                                           const at::Tensor& z, const std::optional<at::Tensor>& modality_mask) {
  const char* op = "cuda_gated_sum_bwd";
  at::Tensor h3, z3, m2;
  bool feature;
  Args a = make_args(h_pre, z, modality_mask, h3, z3, m2, feature, op);
  const DType dtype = dtype_of(h_pre.scalar_type(), op);
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
  TORCH_CHECK((a.rows + gs::kWarps - 1) / gs::kWarps < (int64_t(1) << 31), "cuda_gated_sum_bwd: too many rows");
  check_launch(gs::launch_bwd(dtype, vec, feature, a, stream()), op);
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
