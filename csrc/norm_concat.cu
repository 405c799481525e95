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
#include "device.cuh"
#include "norm_concat.h"

namespace mmk::nc {
namespace {

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

}  // namespace

int launch_fwd(DType dtype, bool vec, bool cached, const Params& p, unsigned grid_x, unsigned grid_y, Stream stream) {
  const dim3 grid(grid_x, grid_y);
  MMK_DISPATCH_DTYPE(dtype, [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      if (cached)
        MMK_LAUNCH((norm_concat_fwd_kernel<scalar_t, VEC, true>), grid, kWarps * 32, 0, stream, p);
      else
        MMK_LAUNCH((norm_concat_fwd_kernel<scalar_t, VEC, false>), grid, kWarps * 32, 0, stream, p);
    });
  });
  return launch_error();
}

int launch_bwd(DType dtype, bool vec, bool cached, int min_blocks, const Params& p, int64_t rows_per_block,
               float* dw_part, float* db_part, int64_t part_stride, unsigned grid_x, unsigned grid_y, size_t smem,
               Stream stream) {
  const dim3 grid(grid_x, grid_y);
  int err = 0;
  MMK_DISPATCH_DTYPE(dtype, [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      auto kernel = cached ? (min_blocks == 1 ? norm_concat_bwd_kernel<scalar_t, VEC, true, 1>
                                              : norm_concat_bwd_kernel<scalar_t, VEC, true, 2>)
                           : norm_concat_bwd_kernel<scalar_t, VEC, false, 2>;
      err = set_dynamic_smem(kernel, smem);
      if (err == 0) MMK_LAUNCH((kernel), grid, kWarps * 32, smem, stream, p, rows_per_block, dw_part, db_part, part_stride);
    });
  });
  return err != 0 ? err : launch_error();
}

}  // namespace mmk::nc
