// norm_concat's torch glue: argument checks, outputs, the launches (norm_concat.cu), the parameter
// gradients' final sum, and the op registration (schema, CUDA or emulator, Meta).
#include "host.h"
#include "norm_concat.h"

#include <cstdlib>
#include <string>
#include <vector>

namespace mmk {
namespace {

using nc::kCacheIters;
using nc::kMaxMods;
using nc::kWarps;
using nc::Mod;
using nc::Params;

// [..., D] -> [N, D] with unit stride along D (a copy only when the view can't be had).
at::Tensor rows2d(const at::Tensor& t, int64_t n) {
  at::Tensor r = t.reshape({n, t.size(-1)});
  if (r.size(1) > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

int64_t row_stride(const at::Tensor& t2) { return t2.size(0) > 1 ? t2.stride(0) : t2.size(1); }

void check_common(at::TensorList xs, const c10::List<std::optional<at::Tensor>>& ws,
                  const c10::List<std::optional<at::Tensor>>& bs, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": xs must not be empty");
  TORCH_CHECK(ws.size() == xs.size() && bs.size() == xs.size(), op, ": one weight and bias entry per x");
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device().type() == MMK_DEVICE_TYPE, op, ": xs[", i, "] must be a CUDA tensor");
    TORCH_CHECK(xs[i].scalar_type() == xs[0].scalar_type(), op, ": xs must share one dtype");
    for (const auto& p : {ws.get(i), bs.get(i)}) {
      if (!p.has_value()) continue;
      TORCH_CHECK(p->dim() == 1 && p->size(0) == xs[i].size(-1) && p->is_contiguous(), op,
                  ": parameters must be contiguous [D_m]");
      TORCH_CHECK(p->scalar_type() == xs[0].scalar_type() || p->scalar_type() == at::kFloat, op,
                  ": parameters must be in the dtype of xs or float32");
    }
  }
}

int bwd_min_blocks() {
  static const int v = [] {
    const char* e = std::getenv("MMKERNELS_NORM_CONCAT_BWD_BLOCKS");
    return (e != nullptr && std::string(e) == "1") ? 1 : 2;
  }();
  return v;
}

// A modality's launch class: bit 0 = 16-byte vectors, bit 1 = row kept in registers.
int mod_class(const Mod& m, bool vec, int64_t esize) {
  const int width = vec ? static_cast<int>(16 / esize) : 1;
  return (vec ? 1 : 0) | (m.d <= kCacheIters * 32 * width ? 2 : 0);
}

Mod make_mod(const at::Tensor& x2, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
             int col) {
  Mod m{};
  m.x = x2.data_ptr();
  m.w = w.has_value() ? w->data_ptr() : nullptr;
  m.b = b.has_value() ? b->data_ptr() : nullptr;
  m.w32 = w.has_value() && w->scalar_type() == at::kFloat;
  m.b32 = b.has_value() && b->scalar_type() == at::kFloat;
  m.sx = row_stride(x2);
  m.d = static_cast<int>(x2.size(1));
  m.col = col;
  return m;
}

}  // namespace

at::Tensor norm_concat_fwd_cuda(at::TensorList xs, const c10::List<std::optional<at::Tensor>>& ws,
                                const c10::List<std::optional<at::Tensor>>& bs, bool rms, double eps) {
  const char* op = "cuda_norm_concat_fwd";
  check_common(xs, ws, bs, op);
  const DType dtype = dtype_of(xs[0].scalar_type(), op);
  MMK_DEVICE_GUARD(xs[0].device());
  const int64_t d_total = [&] { int64_t s = 0; for (const auto& x : xs) s += x.size(-1); return s; }();
  std::vector<int64_t> shape(xs[0].sizes().begin(), xs[0].sizes().end());
  shape.back() = d_total;
  at::Tensor out = at::empty(shape, xs[0].options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel() / std::max<int64_t>(d_total, 1);
  if (n == 0) return out;
  TORCH_CHECK(d_total < (int64_t(1) << 31), "cuda_norm_concat_fwd: sum of D_m must be < 2^31");
  const int64_t esize = xs[0].element_size();
  std::vector<at::Tensor> keep;  // the [N, D] views (and any copies) alive until the launches are queued
  int col = 0;
  for (size_t g0 = 0; g0 < xs.size(); g0 += kMaxMods) {
    const size_t g1 = std::min(xs.size(), g0 + kMaxMods);
    Params p{};
    p.n_rows = n;
    p.eps = static_cast<float>(eps);
    p.rms = rms;
    Mod group[kMaxMods];
    int cls[kMaxMods];
    for (size_t i = g0; i < g1; ++i) {
      keep.push_back(rows2d(xs[i], n));
      const at::Tensor& x2 = keep.back();
      Mod m = make_mod(x2, ws.get(i), bs.get(i), col);
      m.y = static_cast<char*>(out.data_ptr()) + col * esize;
      m.sy = d_total;
      cls[i - g0] = mod_class(m, vec16_ok(esize, {m.x, m.y}, {m.d, m.sx, m.sy, int64_t(col)}), esize);
      group[i - g0] = m;
      col += m.d;
    }
    TORCH_CHECK((n + kWarps - 1) / kWarps < (int64_t(1) << 31), "cuda_norm_concat_fwd: too many rows");
    for (int c = 0; c < 4; ++c) {  // one launch per class present in the group
      int k = 0;
      for (size_t i = 0; i < g1 - g0; ++i)
        if (cls[i] == c) p.mod[k++] = group[i];
      if (k == 0) continue;
      check_launch(nc::launch_fwd(dtype, c & 1, c & 2, p, static_cast<unsigned>((n + kWarps - 1) / kWarps),
                                  static_cast<unsigned>(k), stream()),
                   op);
    }
  }
  return out;
}

std::vector<at::Tensor> norm_concat_bwd_cuda(const at::Tensor& grad_out, at::TensorList xs,
                                             const c10::List<std::optional<at::Tensor>>& ws,
                                             const c10::List<std::optional<at::Tensor>>& bs, bool rms,
                                             double eps) {
  const char* op = "cuda_norm_concat_bwd";
  check_common(xs, ws, bs, op);
  const DType dtype = dtype_of(xs[0].scalar_type(), op);
  MMK_DEVICE_GUARD(xs[0].device());
  int64_t d_total = 0;
  for (const auto& x : xs) d_total += x.size(-1);
  TORCH_CHECK(grad_out.size(-1) == d_total && grad_out.scalar_type() == xs[0].scalar_type(),
              "cuda_norm_concat_bwd: grad_out must be [..., sum D_m] in the dtype of xs");
  const int64_t n = grad_out.numel() / std::max<int64_t>(d_total, 1);
  const int64_t esize = xs[0].element_size();
  at::Tensor dy2 = rows2d(grad_out, n);
  bool any_affine = false;
  for (size_t i = 0; i < xs.size(); ++i) {
    any_affine = any_affine || ws.get(i).has_value() || bs.get(i).has_value();
  }
  std::vector<at::Tensor> dxs;
  for (const auto& x : xs) dxs.push_back(at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)));
  const auto f32 = xs[0].options().dtype(at::kFloat);
  // Launch shape per group of modalities: blocks per modality enough to fill the GPU a few times
  // over, each with rows for every warp.
  const size_t n_groups = (xs.size() + kMaxMods - 1) / kMaxMods;
  auto rows_per_block_of = [&](size_t g) {
    const int64_t mods = static_cast<int64_t>(std::min(xs.size(), (g + 1) * kMaxMods) - g * kMaxMods);
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((4 * num_sms() + mods - 1) / mods,
                                                                  (n + kWarps - 1) / kWarps));
    return (n + blocks - 1) / blocks;
  };
  // dweight/dbias partials: one fp32 row per block, [blocks, sum D_m]. Every block writes the
  // columns of its group's parameters; with several groups of different block counts the rows
  // past a group's count must read as 0.
  int64_t part_rows = 0;
  std::vector<at::Tensor> keep;
  at::Tensor dw_part, db_part;
  if (any_affine && n > 0) {
    for (size_t g = 0; g < n_groups; ++g) {
      const int64_t rpb = rows_per_block_of(g);
      part_rows = std::max(part_rows, (n + rpb - 1) / rpb);
    }
    // zeros when groups have different block counts (rows past a group's count must read as 0);
    // else every entry that is read gets stored (or, for wide rows, zeroed below before the launch)
    const bool zero = n_groups > 1;
    dw_part = zero ? at::zeros({part_rows, d_total}, f32) : at::empty({part_rows, d_total}, f32);
    db_part = zero ? at::zeros({part_rows, d_total}, f32) : at::empty({part_rows, d_total}, f32);
  }
  int col = 0;
  if (n > 0) {
    for (size_t g0 = 0; g0 < xs.size(); g0 += kMaxMods) {
      const size_t g1 = std::min(xs.size(), g0 + kMaxMods);
      const int64_t rows_per_block = rows_per_block_of(g0 / kMaxMods);
      const int64_t grid_x = (n + rows_per_block - 1) / rows_per_block;
      Params p{};
      p.n_rows = n;
      p.eps = static_cast<float>(eps);
      p.rms = rms;
      Mod group[kMaxMods];
      int cls[kMaxMods];
      for (size_t i = g0; i < g1; ++i) {
        keep.push_back(rows2d(xs[i], n));
        Mod m = make_mod(keep.back(), ws.get(i), bs.get(i), col);
        m.dy = static_cast<const char*>(dy2.data_ptr()) + col * esize;
        m.sdy = row_stride(dy2);
        m.y = dxs[i].data_ptr();
        m.sy = m.d;
        cls[i - g0] = mod_class(m, vec16_ok(esize, {m.x, m.y, m.dy}, {m.d, m.sx, m.sdy, int64_t(col)}), esize);
        group[i - g0] = m;
        col += m.d;
      }
      float* dwp = any_affine ? dw_part.data_ptr<float>() : nullptr;
      float* dbp = any_affine ? db_part.data_ptr<float>() : nullptr;
      for (int c = 0; c < 4; ++c) {  // one launch per class present in the group
        int k = 0, max_affine_d = 0;
        for (size_t i = 0; i < g1 - g0; ++i) {
          if (cls[i] != c) continue;
          const Mod& m = group[i];
          const bool affine = m.w != nullptr || m.b != nullptr;
          if (affine) max_affine_d = std::max(max_affine_d, m.d);
          // wide rows add into their partial columns: zero them first (several groups: all zeroed)
          if (!(c & 2) && affine && n_groups == 1) {
            dw_part.narrow(1, m.col, m.d).zero_();
            db_part.narrow(1, m.col, m.d).zero_();
          }
          p.mod[k++] = m;
        }
        if (k == 0) continue;
        const bool cached = c & 2;
        // cached rows sum dweight/dbias in shared memory; wide rows add into zeroed partial rows
        const size_t smem = cached ? static_cast<size_t>(2 * max_affine_d) * sizeof(float) : 0;
        check_smem(smem, op);
        check_launch(nc::launch_bwd(dtype, c & 1, cached, bwd_min_blocks(), p, rows_per_block, dwp, dbp, d_total,
                                    static_cast<unsigned>(grid_x), static_cast<unsigned>(k), smem, stream()),
                     op);
      }
    }
  }
  // parameter gradients: the blocks' partial rows summed in a fixed order, in fp32, then cast to
  // each parameter's dtype (deterministic for cached rows; see the top of the file for wide ones).
  // Columns of modalities without that parameter hold garbage; only parameters' columns are read.
  at::Tensor dw_sum = any_affine && n > 0 ? dw_part.sum(0) : at::Tensor();
  at::Tensor db_sum = any_affine && n > 0 ? db_part.sum(0) : at::Tensor();
  std::vector<at::Tensor> result = dxs;
  std::vector<at::Tensor> dbias;
  col = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t d = xs[i].size(-1);
    for (int which = 0; which < 2; ++which) {
      const auto& prm = which == 0 ? ws.get(i) : bs.get(i);
      if (!prm.has_value()) continue;
      const at::Tensor& sum = which == 0 ? dw_sum : db_sum;
      at::Tensor g = n > 0 ? sum.narrow(0, col, d).to(prm->scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                           : at::zeros_like(*prm);
      (which == 0 ? result : dbias).push_back(g);
    }
    col += static_cast<int>(d);
  }
  result.insert(result.end(), dbias.begin(), dbias.end());
  return result;
}

}  // namespace mmk

// ---- registration: schema, CUDA (or emulator) and Meta implementations ---------------------------

namespace {

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
  for (const auto& x : xs) out.push_back(mmk::meta_like(x));
  for (const auto& list : {ws, bs})
    for (size_t i = 0; i < list.size(); ++i)
      if (list.get(i).has_value()) out.push_back(mmk::meta_like(*list.get(i)));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(MMK_NAMESPACE, m) {
  m.def("cuda_norm_concat_fwd(Tensor[] xs, Tensor?[] weights, Tensor?[] biases, bool rms, float eps) -> Tensor");
  m.def("cuda_norm_concat_bwd(Tensor grad_out, Tensor[] xs, Tensor?[] weights, Tensor?[] biases, bool rms, "
        "float eps) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(MMK_NAMESPACE, MMK_DISPATCH_KEY, m) {
  m.impl("cuda_norm_concat_fwd", &mmk::norm_concat_fwd_cuda);
  m.impl("cuda_norm_concat_bwd", &mmk::norm_concat_bwd_cuda);
}
TORCH_LIBRARY_IMPL(MMK_NAMESPACE, Meta, m) {
  m.impl("cuda_norm_concat_fwd", &norm_concat_fwd_meta);
  m.impl("cuda_norm_concat_bwd", &norm_concat_bwd_meta);
}
