// attention_pool's torch glue: argument checks, the split of the sequence, outputs and
// workspaces, the launches (attention_pool.cu), dquery's final sum, and the op registration
// (schema, CUDA or emulator, Meta).
#include "host.h"
#include "attention_pool.h"

#include <tuple>
#include <vector>

namespace mmk {
namespace {

using ap::AP;
using ap::kMaxQDh;

struct Prepared {
  at::Tensor x, k, q, lengths, cu;
  AP p{};
  bool vec = false;
  int64_t B = 0;
};

// token tile: at most 16 KB of one head's slice, 8..64 rows
int tile_rows(int64_t dh, int64_t esize) {
  int lc = 64;
  while (lc > 8 && static_cast<int64_t>(lc) * dh * esize > 16384) lc /= 2;
  return lc;
}

// Common checks and the kernel arguments of both directions. max_seqlen: the padded L, or the
// longest packed sample (the caller passes a known value).
Prepared prepare(const at::Tensor& x_in, const std::optional<at::Tensor>& key, const at::Tensor& query,
                 const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& cu_seqlens,
                 int64_t max_seqlen, double scale, const char* op) {
  Prepared r;
  const bool packed = cu_seqlens.has_value();
  TORCH_CHECK(x_in.device().type() == MMK_DEVICE_TYPE, op, ": x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() == (packed ? 2 : 3), op, ": x must be ", packed ? "[T, D]" : "[B, L, D]");
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == x_in.scalar_type(), op,
              ": query must be [1 or B, Q, H, Dh] in the dtype of x");
  const int64_t H = query.size(2), Dh = query.size(3), Q = query.size(1), D = x_in.size(-1);
  TORCH_CHECK(H * Dh == D && Q >= 1, op, ": query's H * Dh must equal D");
  TORCH_CHECK(Q * Dh <= kMaxQDh, op, ": Q * Dh must be <= ", kMaxQDh);
  auto unit_last = [](const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); };
  r.x = unit_last(x_in);
  r.k = key.has_value() ? unit_last(*key) : r.x;
  r.q = unit_last(query);
  r.B = packed ? cu_seqlens->size(0) - 1 : r.x.size(0);
  TORCH_CHECK(r.q.size(0) == 1 || r.q.size(0) == r.B, op, ": query's first dim must be 1 or B");
  if (packed) r.cu = cu_seqlens->to(at::kLong).contiguous();
  if (lengths.has_value()) r.lengths = lengths->to(at::kLong).contiguous();
  AP& p = r.p;
  p.x = r.x.data_ptr();
  p.k = r.k.data_ptr();
  p.q = r.q.data_ptr();
  p.cu = packed ? r.cu.data_ptr<int64_t>() : nullptr;
  p.lengths = lengths.has_value() ? r.lengths.data_ptr<int64_t>() : nullptr;
  p.sxb = packed ? 0 : r.x.stride(0);
  p.sxl = r.x.stride(-2);
  p.skb = packed ? 0 : r.k.stride(0);
  p.skl = r.k.stride(-2);
  p.sqb = r.q.size(0) == 1 ? 0 : r.q.stride(0);
  p.sqq = r.q.stride(1);
  p.sqh = r.q.stride(2);
  p.L = packed ? max_seqlen : r.x.size(1);
  p.B = static_cast<int>(r.B);
  p.Q = static_cast<int>(Q);
  p.H = static_cast<int>(H);
  p.Dh = static_cast<int>(Dh);
  p.scale = static_cast<float>(scale);
  p.has_key = key.has_value();
  const int esize = static_cast<int>(x_in.element_size());
  p.lc = tile_rows(Dh, esize);
  r.vec = vec16_ok(esize, {p.x, p.k}, {Dh, p.sxl, p.skl, p.sxb, p.skb});
  return r;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// splits along the sequence so that B * H * splits fills the GPU about four times, >= 2 tiles each
void choose_splits(AP& p, int64_t span) {
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  const int64_t want = std::max<int64_t>(1, ceil_div(4 * num_sms(), std::max<int64_t>(bh, 1)));
  const int64_t most = std::max<int64_t>(1, ceil_div(span, 2 * p.lc));
  int64_t splits = std::min(want, most);
  p.tps = std::max<int64_t>(p.lc, ceil_div(ceil_div(span, splits), p.lc) * p.lc);
  p.splits = static_cast<int>(std::max<int64_t>(1, ceil_div(span, p.tps)));
  TORCH_CHECK(p.splits < 65536, "attention_pool: too many splits");
}

}  // namespace

std::vector<int64_t> attention_pool_smem_bytes(int64_t q, int64_t dh, int64_t elem_size, bool has_key) {
  TORCH_CHECK(q >= 1 && dh >= 1 && q * dh <= kMaxQDh && (elem_size == 2 || elem_size == 4),
              "cuda_attention_pool_smem: needs 1 <= Q * Dh <= ", kMaxQDh, " and a 2- or 4-byte dtype");
  const int lc = tile_rows(dh, elem_size);
  const int qi = static_cast<int>(q), di = static_cast<int>(dh), ei = static_cast<int>(elem_size);
  return {static_cast<int64_t>(ap::smem_bytes(false, qi, di, lc, ei, has_key)),
          static_cast<int64_t>(ap::smem_bytes(true, qi, di, lc, ei, has_key))};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& key,
                                                           const at::Tensor& query,
                                                           const std::optional<at::Tensor>& lengths,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           int64_t max_seqlen, double scale) {
  const char* op = "cuda_attention_pool_fwd";
  MMK_DEVICE_GUARD(x.device());
  Prepared r = prepare(x, key, query, lengths, cu_seqlens, max_seqlen, scale, op);
  const DType dtype = dtype_of(x.scalar_type(), op);
  AP& p = r.p;
  const int64_t D = x.size(-1);
  at::Tensor out = at::empty({r.B, p.Q, D}, x.options());
  at::Tensor lse = at::empty({r.B, p.Q, p.H}, x.options().dtype(at::kFloat));
  if (r.B == 0) return {out, lse};
  choose_splits(p, p.L);
  p.y = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  at::Tensor ws, ws_m;
  const int64_t slots = r.B * p.H * p.splits;
  if (p.splits > 1) {
    ws = at::empty({slots * p.Q * p.Dh}, lse.options());
    ws_m = at::empty({2 * slots * p.Q}, lse.options());
    p.ws = ws.data_ptr<float>();
    p.ws_m = ws_m.data_ptr<float>();
  }
  TORCH_CHECK(r.B * p.H < (int64_t(1) << 31), "cuda_attention_pool_fwd: B * H too large");
  check_smem(ap::smem_bytes(false, p.Q, p.Dh, p.lc, static_cast<int>(x.element_size()), p.has_key), op);
  check_launch(ap::launch_fwd(dtype, r.vec, p, static_cast<unsigned>(r.B * p.H), static_cast<unsigned>(p.splits),
                              stream()),
               op);
  return {out, lse};
}

std::vector<at::Tensor> attention_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                const std::optional<at::Tensor>& key, const at::Tensor& query,
                                                const std::optional<at::Tensor>& lengths,
                                                const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                                const at::Tensor& lse, int64_t max_seqlen, double scale) {
  const char* op = "cuda_attention_pool_bwd";
  MMK_DEVICE_GUARD(x.device());
  Prepared r = prepare(x, key, query, lengths, cu_seqlens, max_seqlen, scale, op);
  const DType dtype = dtype_of(x.scalar_type(), op);
  AP& p = r.p;
  const int64_t D = x.size(-1);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 3 && out.size(0) == r.B && out.size(2) == D,
              "cuda_attention_pool_bwd: grad_out and out must be [B, Q, D]");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "cuda_attention_pool_bwd: grad_out and out must have the dtype of x");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == r.B * p.Q * p.H,
              "cuda_attention_pool_bwd: lse must be fp32 [B, Q, H]");
  TORCH_CHECK(r.B * p.H < (int64_t(1) << 31), "cuda_attention_pool_bwd: B * H too large");
  at::Tensor dout = grad_out.contiguous(), outc = out.contiguous(), lsec = lse.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = key.has_value() ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                                  : at::Tensor();
  const int64_t span = cu_seqlens.has_value() ? p.L : x.size(1);
  if (r.B == 0 || x.numel() == 0) {
    dx.zero_();
    if (dk.defined()) dk.zero_();
    std::vector<at::Tensor> res{dx, at::zeros(query.sizes(), query.options())};
    if (dk.defined()) res.push_back(dk);
    return res;
  }
  choose_splits(p, span);
  at::Tensor ws = at::empty({static_cast<int64_t>(p.splits), r.B, p.Q, D}, x.options().dtype(at::kFloat));
  p.dout = dout.data_ptr();
  p.out = outc.data_ptr();
  p.lse = lsec.data_ptr<float>();
  p.y = dx.data_ptr();
  p.dk = dk.defined() ? dk.data_ptr() : nullptr;
  p.ws = ws.data_ptr<float>();
  const int esize = static_cast<int>(x.element_size());
  // dx / dkey are written with the staging width: D (row stride) must line up too
  r.vec = r.vec && vec16_ok(esize, {p.y, p.dk}, {D});
  check_smem(ap::smem_bytes(true, p.Q, p.Dh, p.lc, esize, p.has_key), op);
  check_launch(ap::launch_bwd(dtype, r.vec, p, static_cast<unsigned>(r.B * p.H), static_cast<unsigned>(p.splits),
                              stream()),
               op);
  // dq: the splits' partials summed in a fixed order (and over the batch for a shared query)
  at::Tensor dq = ws.sum(0);                                   // [B, Q, D]
  if (query.size(0) == 1) dq = dq.sum(0, /*keepdim=*/true);    // [1, Q, D]
  dq = dq.view(query.sizes()).to(query.scalar_type());
  std::vector<at::Tensor> res{dx, dq.contiguous()};
  if (dk.defined()) res.push_back(dk);
  return res;
}

}  // namespace mmk

// ---- registration: schema, CUDA (or emulator) and Meta implementations ---------------------------

namespace {

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
  std::vector<at::Tensor> out{mmk::meta_like(x), mmk::meta_like(query)};
  if (key.has_value()) out.push_back(mmk::meta_like(*key));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(MMK_NAMESPACE, m) {
  m.def("cuda_attention_pool_fwd(Tensor x, Tensor? key, Tensor query, Tensor? lengths, Tensor? cu_seqlens, "
        "int max_seqlen, float scale) -> (Tensor, Tensor)");
  m.def("cuda_attention_pool_bwd(Tensor grad_out, Tensor x, Tensor? key, Tensor query, Tensor? lengths, "
        "Tensor? cu_seqlens, Tensor out, Tensor lse, int max_seqlen, float scale) -> Tensor[]");
  // shared memory per block of the kernels, {forward, backward} bytes: no tensors, so registered
  // for every dispatch key (the Python backend checks it against the GPU's limit)
  m.def("cuda_attention_pool_smem(int q, int dh, int elem_size, bool has_key) -> int[]",
        &mmk::attention_pool_smem_bytes);
}
TORCH_LIBRARY_IMPL(MMK_NAMESPACE, MMK_DISPATCH_KEY, m) {
  m.impl("cuda_attention_pool_fwd", &mmk::attention_pool_fwd_cuda);
  m.impl("cuda_attention_pool_bwd", &mmk::attention_pool_bwd_cuda);
}
TORCH_LIBRARY_IMPL(MMK_NAMESPACE, Meta, m) {
  m.impl("cuda_attention_pool_fwd", &attention_pool_fwd_meta);
  m.impl("cuda_attention_pool_bwd", &attention_pool_bwd_meta);
}
