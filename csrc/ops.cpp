// Registration of the CUDA C++ kernels: schemas in the `mmkernels` namespace (next to the Python
// custom ops of the same namespace, which call these from their `cuda` backend), CUDA kernels and
// Meta (shape-only) implementations. The Meta implementations are what torch.compile's fake
// tensors run when the `cuda` backend is selected (see mmkernels/cuda/__init__.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

namespace mmk {

// CUDA implementations (csrc/*.cu)
at::Tensor norm_concat_fwd_cuda(at::TensorList xs, const c10::List<std::optional<at::Tensor>>& ws,
                                const c10::List<std::optional<at::Tensor>>& bs, bool rms, double eps);
std::vector<at::Tensor> norm_concat_bwd_cuda(const at::Tensor& grad_out, at::TensorList xs,
                                             const c10::List<std::optional<at::Tensor>>& ws,
                                             const c10::List<std::optional<at::Tensor>>& bs, bool rms, double eps);
std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& key,
                                                           const at::Tensor& query,
                                                           const std::optional<at::Tensor>& lengths,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           int64_t max_seqlen, double scale);
std::vector<at::Tensor> attention_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                const std::optional<at::Tensor>& key, const at::Tensor& query,
                                                const std::optional<at::Tensor>& lengths,
                                                const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                                const at::Tensor& lse, int64_t max_seqlen, double scale);
// shared memory per block of the attention_pool kernels: {forward, backward} bytes (no tensors:
// registered for every dispatch key; the Python backend checks it against the GPU's limit)
std::vector<int64_t> attention_pool_smem_bytes(int64_t q, int64_t dh, int64_t elem_size, bool has_key);
at::Tensor gated_sum_fwd_cuda(const at::Tensor& h_pre, const at::Tensor& z,
                              const std::optional<at::Tensor>& modality_mask);
std::vector<at::Tensor> gated_sum_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& h_pre, const at::Tensor& z,
                                           const std::optional<at::Tensor>& modality_mask);

namespace {

// ---- Meta: shapes and dtypes only --------------------------------------------------------------

at::Tensor like(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

at::Tensor norm_concat_fwd_meta(at::TensorList xs, const c10::List<std::optional<at::Tensor>>&,
                                const c10::List<std::optional<at::Tensor>>&, bool, double) {
  TORCH_CHECK(!xs.empty(), "cuda_norm_concat_fwd: xs must not be empty");
  std::vector<c10::SymInt> shape(xs[0].sym_sizes().begin(), xs[0].sym_sizes().end());
  c10::SymInt total = 0;
  for (const auto& x : xs) total = total + x.sym_size(-1);
  shape.back() = total;
  return at::empty_symint(shape, xs[0].options());
}

std::vector<at::Tensor> norm_concat_bwd_meta(const at::Tensor&, at::TensorList xs,
                                             const c10::List<std::optional<at::Tensor>>& ws,
                                             const c10::List<std::optional<at::Tensor>>& bs, bool, double) {
  std::vector<at::Tensor> out;
  for (const auto& x : xs) out.push_back(like(x));
  for (const auto& list : {ws, bs})
    for (size_t i = 0; i < list.size(); ++i)
      if (list.get(i).has_value()) out.push_back(like(*list.get(i)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_meta(const at::Tensor& x, const std::optional<at::Tensor>&,
                                                           const at::Tensor& query, const std::optional<at::Tensor>&,
                                                           const std::optional<at::Tensor>& cu_seqlens, int64_t,
                                                           double) {
  const c10::SymInt b = cu_seqlens.has_value() ? cu_seqlens->sym_size(0) - 1 : x.sym_size(0);
  const c10::SymInt q = query.sym_size(1), h = query.sym_size(2);
  return {at::empty_symint({b, q, x.sym_size(-1)}, x.options()),
          at::empty_symint({b, q, h}, x.options().dtype(at::kFloat))};
}

std::vector<at::Tensor> attention_pool_bwd_meta(const at::Tensor&, const at::Tensor& x,
                                                const std::optional<at::Tensor>& key, const at::Tensor& query,
                                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                const at::Tensor&, const at::Tensor&, int64_t, double) {
  std::vector<at::Tensor> out{like(x), like(query)};
  if (key.has_value()) out.push_back(like(*key));
  return out;
}

at::Tensor gated_sum_fwd_meta(const at::Tensor& h_pre, const at::Tensor&, const std::optional<at::Tensor>&) {
  std::vector<c10::SymInt> shape(h_pre.sym_sizes().begin(), h_pre.sym_sizes().end() - 2);
  shape.push_back(h_pre.sym_size(-1));
  return at::empty_symint(shape, h_pre.options());
}

std::vector<at::Tensor> gated_sum_bwd_meta(const at::Tensor&, const at::Tensor& h_pre, const at::Tensor& z,
                                           const std::optional<at::Tensor>&) {
  return {like(h_pre), like(z)};
}

}  // namespace
}  // namespace mmk

// Built for the CPU emulator (tests; MMK_EMULATE), the same kernels register as `mmkernels_emu`
// ops on CPU tensors instead.
namespace {
void define_ops(torch::Library& m) {
  m.def("cuda_norm_concat_fwd(Tensor[] xs, Tensor?[] weights, Tensor?[] biases, bool rms, float eps) -> Tensor");
  m.def("cuda_norm_concat_bwd(Tensor grad_out, Tensor[] xs, Tensor?[] weights, Tensor?[] biases, bool rms, "
        "float eps) -> Tensor[]");
  m.def("cuda_attention_pool_fwd(Tensor x, Tensor? key, Tensor query, Tensor? lengths, Tensor? cu_seqlens, "
        "int max_seqlen, float scale) -> (Tensor, Tensor)");
  m.def("cuda_attention_pool_bwd(Tensor grad_out, Tensor x, Tensor? key, Tensor query, Tensor? lengths, "
        "Tensor? cu_seqlens, Tensor out, Tensor lse, int max_seqlen, float scale) -> Tensor[]");
  m.def("cuda_gated_sum_fwd(Tensor h_pre, Tensor z, Tensor? modality_mask) -> Tensor");
  m.def("cuda_gated_sum_bwd(Tensor grad_out, Tensor h_pre, Tensor z, Tensor? modality_mask) -> Tensor[]");
  m.def("cuda_attention_pool_smem(int q, int dh, int elem_size, bool has_key) -> int[]",
        &mmk::attention_pool_smem_bytes);
}

void device_impls(torch::Library& m) {
  m.impl("cuda_norm_concat_fwd", &mmk::norm_concat_fwd_cuda);
  m.impl("cuda_norm_concat_bwd", &mmk::norm_concat_bwd_cuda);
  m.impl("cuda_attention_pool_fwd", &mmk::attention_pool_fwd_cuda);
  m.impl("cuda_attention_pool_bwd", &mmk::attention_pool_bwd_cuda);
  m.impl("cuda_gated_sum_fwd", &mmk::gated_sum_fwd_cuda);
  m.impl("cuda_gated_sum_bwd", &mmk::gated_sum_bwd_cuda);
}

void meta_impls(torch::Library& m) {
  m.impl("cuda_norm_concat_fwd", &mmk::norm_concat_fwd_meta);
  m.impl("cuda_norm_concat_bwd", &mmk::norm_concat_bwd_meta);
  m.impl("cuda_attention_pool_fwd", &mmk::attention_pool_fwd_meta);
  m.impl("cuda_attention_pool_bwd", &mmk::attention_pool_bwd_meta);
  m.impl("cuda_gated_sum_fwd", &mmk::gated_sum_fwd_meta);
  m.impl("cuda_gated_sum_bwd", &mmk::gated_sum_bwd_meta);
}
}  // namespace

#ifndef MMK_EMULATE
TORCH_LIBRARY(mmkernels, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) { device_impls(m); }
TORCH_LIBRARY_IMPL(mmkernels, Meta, m) { meta_impls(m); }
#else
TORCH_LIBRARY(mmkernels_emu, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(mmkernels_emu, CPU, m) { device_impls(m); }
TORCH_LIBRARY_IMPL(mmkernels_emu, Meta, m) { meta_impls(m); }
#endif
