// norm_concat: per-modality LayerNorm / RMSNorm + affine, written straight into the concatenated
// output, forward and backward, in one launch each (per group of up to kMaxMods modalities).
//
// Layout: each modality is viewed as [N, D_m] with unit stride along D_m and any row stride; the
// output (forward) is [N, sum D_m] and modality m owns columns [col_m, col_m + D_m).
// One warp owns one (row, modality): it reads the row with 16-byte vector loads (when that
// modality's pointers, D_m, strides and output column line up), keeps up to kCacheIters vectors
// per lane in registers (else re-reads, from L1), reduces with shuffles and writes the normalised
// row. Vector width and caching are decided per modality: the modalities of a group are launched
// in up to four classes (16-byte or scalar, cached or wide), so one misaligned width (D = 300)
// does not take the others off the vector path. Statistics in fp32,
// two-pass (mean, then the centred sum of squares), as the reference.
// Backward: dx from the recomputed statistics; dweight / dbias are summed per block into one fp32
// partial row per block, and the partial rows are reduced by the host in a fixed order. Bitwise
// run-to-run determinism holds for rows that fit the register cache; wider rows add their warps'
// sums into the partial row with float atomics, whose order varies (fp32 rounding only).
#include "common.cuh"

#include <cstdlib>
#include <string>
#include <vector>

namespace mmk {
namespace {

constexpr int kMaxMods = 8;      // modalities per launch (more: several launches)
constexpr int kWarps = 8;        // warps (rows) per block
constexpr int kCacheIters = 4;   // vectors per lane kept in registers (bf16: D <= 1024)

struct Mod {
  const void* x;
  const void* w;      // nullptr: no weight
  const void* b;      // nullptr: no bias
  const void* dy;     // backward: grad of the output at this modality's first column
  void* y;            // forward: output at this modality's first column; backward: dx
  int64_t sx;         // row stride of x (elements)
  int64_t sy;         // row stride of y / dx
  int64_t sdy;        // row stride of dy
  int d;
  int col;            // first output column (partials of the backward)
  bool w32, b32;      // parameter stored as fp32 (else as the input dtype)
};

struct Params {
  Mod mod[kMaxMods];
  int64_t n_rows;
  float eps;
  bool rms;
};

template <typename T>
__device__ __forceinline__ float param(const void* p, bool f32, int i, float dflt) {
  if (p == nullptr) return dflt;
  return f32 ? static_cast<const float*>(p)[i] : to_f(static_cast<const T*>(p)[i]);
}

// The lane's register cache of its row: up to kCacheIters vectors, kept in the storage dtype
// (16 bytes each: 16-bit rows take half the registers fp32 copies would).
template <typename T, int VEC> using RowCache = Vec<T, VEC>[kCacheIters];

// Elements k..k+VEC of the row: from the lane's register cache (iteration `it`), or re-read.
template <typename T, int VEC, bool CACHED>
__device__ __forceinline__ void row_vec(const RowCache<T, VEC>& c, int it, const T* __restrict__ x, int k,
                                        float (&v)[VEC]) {
  if (CACHED) {
    to_f(c[it], v);
  } else {
    load_f<T, VEC>(x + k, v);
  }
}

// Row statistics of one warp's row: mean (0 for rmsnorm) and 1 / sqrt(var + eps).
template <typename T, int VEC, bool CACHED>
__device__ __forceinline__ void row_stats(const T* __restrict__ x, int d, int lane, bool rms, float eps,
                                          RowCache<T, VEC>& c, float& mean, float& rstd) {
  const int step = 32 * VEC;
  float s = 0.f;
#pragma unroll
  for (int it = 0; it < (CACHED ? kCacheIters : 1); ++it) {
    for (int k = (it * 32 + lane) * VEC; k < (CACHED ? min(d, (it + 1) * step) : d); k += step) {
      const Vec<T, VEC> r = load_vec<T, VEC>(x + k);
      if (CACHED) c[it] = r;
      float v[VEC];
      to_f(r, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += v[i];
    }
  }
  mean = rms ? 0.f : warp_sum(s) / d;
  float q = 0.f;
#pragma unroll
  for (int it = 0; it < (CACHED ? kCacheIters : 1); ++it) {
    for (int k = (it * 32 + lane) * VEC; k < (CACHED ? min(d, (it + 1) * step) : d); k += step) {
      float v[VEC];
      row_vec<T, VEC, CACHED>(c, it, x, k, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) q += (v[i] - mean) * (v[i] - mean);
    }
  }
  rstd = rsqrtf(warp_sum(q) / d + eps);
}

template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kWarps * 32) norm_concat_fwd_kernel(const __grid_constant__ Params p) {
  const Mod& m = p.mod[blockIdx.y];
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;
  const T* x = static_cast<const T*>(m.x) + row * m.sx;
  T* y = static_cast<T*>(m.y) + row * m.sy;
  const int d = m.d, step = 32 * VEC;
  RowCache<T, VEC> c;
  float mean, rstd;
  row_stats<T, VEC, CACHED>(x, d, lane, p.rms, p.eps, c, mean, rstd);
#pragma unroll
  for (int it = 0; it < (CACHED ? kCacheIters : 1); ++it) {
    for (int k = (it * 32 + lane) * VEC; k < (CACHED ? min(d, (it + 1) * step) : d); k += step) {
      float v[VEC];
      row_vec<T, VEC, CACHED>(c, it, x, k, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        v[i] = (v[i] - mean) * rstd * param<T>(m.w, m.w32, k + i, 1.f) + param<T>(m.b, m.b32, k + i, 0.f);
      store_f<T, VEC>(y + k, v);
    }
  }
}

// grid (blocks, modalities); block b of a modality owns rows [b * rows_per_block, ...).
// dweight / dbias: with the row cached (D <= kCacheIters * 32 * VEC) each lane sums its own
// columns over the warp's rows in registers, and the block's warps add theirs into shared memory
// one warp at a time (no atomics; shared-memory float atomics are CAS loops on sm_80/sm_90) before
// one plain store per column into the block's partial row. Wider rows add into the block's
// partial row in global memory with fp32 reductions (RED, native), which the host zeroes first.
// MIN_BLOCKS: blocks per SM that __launch_bounds__ promises (2: <= 128 registers, 16 warps per SM;
// 1: up to 255 registers, no spill in the cached 16-bit variants). 2 unless
// MMKERNELS_NORM_CONCAT_BWD_BLOCKS=1 is set (read once; for timing one against the other).
template <typename T, int VEC, bool CACHED, int MIN_BLOCKS>
__global__ void __launch_bounds__(kWarps * 32, MIN_BLOCKS)
norm_concat_bwd_kernel(const __grid_constant__ Params p, int64_t rows_per_block, float* __restrict__ dw_part,
                       float* __restrict__ db_part, int64_t part_stride) {
  MMK_DYNAMIC_SMEM(float, smem);
  const Mod& m = p.mod[blockIdx.y];
  const int d = m.d, step = 32 * VEC;
  const bool has_w = m.w != nullptr, has_b = m.b != nullptr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t part = static_cast<int64_t>(blockIdx.x) * part_stride + m.col;  // this block's partial row
  constexpr int kAcc = CACHED ? kCacheIters : 1;
  float aw[kAcc][VEC], ab[kAcc][VEC];
#pragma unroll
  for (int it = 0; it < kAcc; ++it)
#pragma unroll
    for (int i = 0; i < VEC; ++i) { aw[it][i] = 0.f; ab[it][i] = 0.f; }
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = lmin(first + rows_per_block, p.n_rows);
  for (int64_t row = first + warp; row < last; row += kWarps) {
    const T* x = static_cast<const T*>(m.x) + row * m.sx;
    const T* dy = static_cast<const T*>(m.dy) + row * m.sdy;
    T* dx = static_cast<T*>(m.y) + row * m.sy;
    RowCache<T, VEC> c;
    float mean, rstd;
    row_stats<T, VEC, CACHED>(x, d, lane, p.rms, p.eps, c, mean, rstd);
    // sums of g = dy * w and of g * xhat over the row; the parameter gradients' terms
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int it = 0; it < (CACHED ? kCacheIters : 1); ++it) {
      for (int k = (it * 32 + lane) * VEC; k < (CACHED ? min(d, (it + 1) * step) : d); k += step) {
        float v[VEC], g[VEC];
        row_vec<T, VEC, CACHED>(c, it, x, k, v);
        load_f<T, VEC>(dy + k, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (v[i] - mean) * rstd;
          if (CACHED) {
            aw[it][i] += g[i] * xh;
            ab[it][i] += g[i];
          } else {
            if (has_w) atomicAdd(&dw_part[part + k + i], g[i] * xh);
            if (has_b) atomicAdd(&db_part[part + k + i], g[i]);
          }
          const float gw = g[i] * param<T>(m.w, m.w32, k + i, 1.f);
          sg += gw;
          sgx += gw * xh;
        }
      }
    }
    const float mg = p.rms ? 0.f : warp_sum(sg) / d;
    const float mgx = warp_sum(sgx) / d;
#pragma unroll
    for (int it = 0; it < (CACHED ? kCacheIters : 1); ++it) {
      for (int k = (it * 32 + lane) * VEC; k < (CACHED ? min(d, (it + 1) * step) : d); k += step) {
        float v[VEC], g[VEC];
        row_vec<T, VEC, CACHED>(c, it, x, k, v);
        load_f<T, VEC>(dy + k, g);  // second read of dy: an L1 hit
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (v[i] - mean) * rstd;
          const float gw = g[i] * param<T>(m.w, m.w32, k + i, 1.f);
          v[i] = rstd * (gw - mg - xh * mgx);
        }
        store_f<T, VEC>(dx + k, v);
      }
    }
  }
  if (CACHED && (has_w || has_b)) {  // block-uniform branch: the barriers below are reached by all
    float* sdw = smem;
    float* sdb = smem + d;
    for (int k = threadIdx.x; k < 2 * d; k += blockDim.x) smem[k] = 0.f;
    __syncthreads();
    for (int w = 0; w < kWarps; ++w) {  // warps in turn: every lane owns distinct columns
      if (warp == w) {
#pragma unroll
        for (int it = 0; it < kCacheIters; ++it) {
          const int k = (it * 32 + lane) * VEC;
          if (k < d) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              sdw[k + i] += aw[it][i];
              sdb[k + i] += ab[it][i];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
      if (has_w) dw_part[part + k] = sdw[k];
      if (has_b) db_part[part + k] = sdb[k];
    }
  }
}

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
  check_common(xs, ws, bs, "cuda_norm_concat_fwd");
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
      const bool vec = c & 1, cached = c & 2;
      const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps), static_cast<unsigned>(k));
      MMK_DISPATCH_FLOATS(xs[0].scalar_type(), "cuda_norm_concat_fwd", [&] {
        MMK_DISPATCH_VEC(vec, [&] {
          if (cached)
            MMK_LAUNCH((norm_concat_fwd_kernel<scalar_t, VEC, true>), grid, kWarps * 32, 0, p);
          else
            MMK_LAUNCH((norm_concat_fwd_kernel<scalar_t, VEC, false>), grid, kWarps * 32, 0, p);
        });
      });
    }
  }
  return out;
}

std::vector<at::Tensor> norm_concat_bwd_cuda(const at::Tensor& grad_out, at::TensorList xs,
                                             const c10::List<std::optional<at::Tensor>>& ws,
                                             const c10::List<std::optional<at::Tensor>>& bs, bool rms,
                                             double eps) {
  check_common(xs, ws, bs, "cuda_norm_concat_bwd");
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
        const bool vec = c & 1, cached = c & 2;
        const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(k));
        // cached rows sum dweight/dbias in shared memory; wide rows add into zeroed partial rows
        const size_t smem = cached ? static_cast<size_t>(2 * max_affine_d) * sizeof(float) : 0;
        MMK_DISPATCH_FLOATS(xs[0].scalar_type(), "cuda_norm_concat_bwd", [&] {
          MMK_DISPATCH_VEC(vec, [&] {
            auto kernel = cached ? (bwd_min_blocks() == 1 ? norm_concat_bwd_kernel<scalar_t, VEC, true, 1>
                                                          : norm_concat_bwd_kernel<scalar_t, VEC, true, 2>)
                                 : norm_concat_bwd_kernel<scalar_t, VEC, false, 2>;
            set_dynamic_smem(kernel, smem, "cuda_norm_concat_bwd");
            MMK_LAUNCH((kernel), grid, kWarps * 32, smem, p, rows_per_block, dwp, dbp, d_total);
          });
        });
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
