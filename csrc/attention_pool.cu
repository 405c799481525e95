// attention_pool / attention_pool_varlen: multi-head attention pooling of a token sequence by Q
// queries per head, forward and backward (flash-decoding style: online softmax over token tiles,
// split along the sequence when batch x heads cannot fill the GPU).
//
// One block per (sample b, head h, split s), 256 threads. Token tiles of LC rows x Dh columns of
// the head's slice of x (and key) are staged in shared memory with 16-byte vector loads (when
// the pointers, D and strides line up), in padded rows (no bank conflicts for 16-byte reads).
// Forward per tile: scores S[q][l] = scale*log2(e) * <q, k_l> (fp32), the online softmax update
// (one warp per query), then acc[q][:] = acc * alpha + P[q][:] @ V. With one split the block
// writes out = acc / den and lse; with several it writes fp32 partials (m, den, acc) that a
// second kernel merges. Empty rows (length 0) give out = 0 and lse = -inf.
// Backward per tile, with lse and delta_q = <dO_q, O_q>: P = exp(S - lse), dP = dO @ V^T,
// dS = P * (dP - delta); dx = P^T dO (+ scale dS^T Q when the keys are x), dkey = scale dS^T Q,
// dq += scale dS @ K in shared memory, written as fp32 partials per (split, sample) that the host
// sums in a fixed order (and over the batch for a shared query). Padded positions (l >= length)
// get dx = 0. Offsets are int64 throughout.
#include "device.cuh"
#include "attention_pool.h"

namespace mmk::ap {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int64_t seq_len(const AP& p, int b) {
  if (p.cu != nullptr) return p.cu[b + 1] - p.cu[b];
  if (p.lengths != nullptr) return lmax(0, lmin(p.lengths[b], p.L));
  return p.L;
}

// first row of sample b, in elements, for a tensor with batch / token strides sb / sl
__device__ __forceinline__ int64_t row0(const AP& p, int b, int64_t sb, int64_t sl) {
  return p.cu != nullptr ? p.cu[b] * sl : static_cast<int64_t>(b) * sb;
}

__host__ __device__ __forceinline__ int pad_row(int dh, int esize) { return dh + 16 / esize; }

// Stage tokens [t0, t0 + n) of one head (columns [col, col + Dh)) into a [lc][pad_row] tile, zeros past n.
template <typename T, int VEC>
__device__ __forceinline__ void stage(T* __restrict__ tile, const T* __restrict__ base, int64_t sl,
                                      int64_t t0, int n, int lc, int dh) {
  const int per_row = dh / VEC;
  const int pr = pad_row(dh, sizeof(T));
  for (int i = threadIdx.x; i < lc * per_row; i += kThreads) {
    const int l = i / per_row, c = (i - l * per_row) * VEC;
    Vec<T, VEC> v;
    if (l < n) {
      v = *reinterpret_cast<const Vec<T, VEC>*>(base + (t0 + l) * sl + c);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = from_f<T>(0.f);
    }
    *reinterpret_cast<Vec<T, VEC>*>(tile + l * pr + c) = v;
  }
}

// <a[0:dh] (fp32, shared), tile row (T, shared)>
template <typename T, int VEC>
__device__ __forceinline__ float dot_row(const float* __restrict__ a, const T* __restrict__ row, int dh) {
  float s = 0.f;
  for (int c = 0; c < dh; c += VEC) {
    float v[VEC];
    load_f<T, VEC>(row + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += a[c + j] * v[j];
  }
  return s;
}

// acc[e] (= (q, d) of a [Q][Dh] fp32 array in shared memory) = acc[e] * alpha[q] + sum_l W[q][l] * tile[l][d]
// for l < n. With fewer elements than threads, G groups of threads split the tokens and `red`
// (kThreads floats) combines them. Ends with every thread past a barrier.
template <typename T>
__device__ __forceinline__ void accumulate(float* __restrict__ acc, const float* __restrict__ alpha,
                                           const float* __restrict__ w, const T* __restrict__ tile,
                                           float* __restrict__ red, int q_n, int dh, int lc, int n) {
  const int e_n = q_n * dh;
  const int groups = max(1, kThreads / e_n);
  const int pr = pad_row(dh, sizeof(T));
  if (groups == 1) {
    for (int e = threadIdx.x; e < e_n; e += kThreads) {
      const int qi = e / dh, d = e - qi * dh;
      float s = 0.f;
      for (int l = 0; l < n; ++l) s += w[qi * lc + l] * to_f(tile[l * pr + d]);
      acc[e] = (alpha ? acc[e] * alpha[qi] : acc[e]) + s;
    }
    __syncthreads();
    return;
  }
  const int t = threadIdx.x;
  if (t < groups * e_n) {
    const int g = t / e_n, e = t - g * e_n;
    const int qi = e / dh, d = e - qi * dh;
    float s = 0.f;
    for (int l = g; l < n; l += groups) s += w[qi * lc + l] * to_f(tile[l * pr + d]);
    red[t] = s;
  }
  __syncthreads();
  if (t < e_n) {
    const int qi = t / dh;
    float s = 0.f;
    for (int g = 0; g < groups; ++g) s += red[g * e_n + t];
    acc[t] = (alpha ? acc[t] * alpha[qi] : acc[t]) + s;
  }
  __syncthreads();
}

struct FwdSmem {
  float *qs, *acc, *s, *m, *den, *alpha, *red;
  void *kt, *vt;
};

__host__ __device__ __forceinline__ size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

// Shared-memory layout (bytes): one function for the host's size and the kernel's pointers.
__host__ __device__ inline size_t fwd_smem(int q_n, int dh, int lc, int esize, bool has_key, char* base,
                                           FwdSmem* out) {
  size_t off = 0;
  auto take = [&](size_t bytes) { char* p = base + off; off += align16(bytes); return p; };
  char* qs = take(sizeof(float) * q_n * dh);
  char* acc = take(sizeof(float) * q_n * dh);
  char* s = take(sizeof(float) * q_n * lc);
  char* m = take(sizeof(float) * q_n);
  char* den = take(sizeof(float) * q_n);
  char* alpha = take(sizeof(float) * q_n);
  char* red = take(sizeof(float) * kThreads);
  char* kt = take(static_cast<size_t>(esize) * lc * pad_row(dh, esize));
  char* vt = has_key ? take(static_cast<size_t>(esize) * lc * pad_row(dh, esize)) : kt;
  if (out != nullptr) {
    *out = FwdSmem{reinterpret_cast<float*>(qs), reinterpret_cast<float*>(acc), reinterpret_cast<float*>(s),
                   reinterpret_cast<float*>(m), reinterpret_cast<float*>(den), reinterpret_cast<float*>(alpha),
                   reinterpret_cast<float*>(red), kt, vt};
  }
  return off;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) attn_pool_fwd_kernel(const __grid_constant__ AP p) {
  MMK_DYNAMIC_SMEM(char, smem_raw);
  FwdSmem sm;
  fwd_smem(p.Q, p.Dh, p.lc, sizeof(T), p.has_key, smem_raw, &sm);
  T* kt = static_cast<T*>(sm.kt);
  T* vt = static_cast<T*>(sm.vt);
  const int b = blockIdx.x / p.H, h = blockIdx.x - b * p.H, split = blockIdx.y;
  const int dh = p.Dh, q_n = p.Q, lc = p.lc, e_n = q_n * dh;
  const int pr = pad_row(dh, sizeof(T));
  const int64_t len = seq_len(p, b);
  const int64_t t_begin = static_cast<int64_t>(split) * p.tps;
  const int64_t t_end = lmin(len, t_begin + p.tps);
  const T* xb = static_cast<const T*>(p.x) + row0(p, b, p.sxb, p.sxl) + static_cast<int64_t>(h) * dh;
  const T* kb = static_cast<const T*>(p.k) + row0(p, b, p.skb, p.skl) + static_cast<int64_t>(h) * dh;
  const T* qb = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.sqb + static_cast<int64_t>(h) * p.sqh;
  const float qscale = p.scale * kLog2e;
  for (int e = threadIdx.x; e < e_n; e += kThreads) {
    const int qi = e / dh, d = e - qi * dh;
    sm.qs[e] = to_f(qb[qi * p.sqq + d]) * qscale;
    sm.acc[e] = 0.f;
  }
  for (int qi = threadIdx.x; qi < q_n; qi += kThreads) { sm.m[qi] = -INFINITY; sm.den[qi] = 0.f; }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += lc) {
    const int n = static_cast<int>(lmin(lc, t_end - t0));
    stage<T, VEC>(kt, kb, p.skl, t0, n, lc, dh);
    if (p.has_key) stage<T, VEC>(vt, xb, p.sxl, t0, n, lc, dh);
    __syncthreads();
    for (int i = threadIdx.x; i < q_n * lc; i += kThreads) {
      const int qi = i / lc, l = i - qi * lc;
      sm.s[i] = l < n ? dot_row<T, VEC>(sm.qs + qi * dh, kt + l * pr, dh) : -INFINITY;
    }
    __syncthreads();
    for (int qi = warp; qi < q_n; qi += kThreads / 32) {  // online softmax, one warp per query
      float mx = -INFINITY;
      for (int l = lane; l < lc; l += 32) mx = fmaxf(mx, sm.s[qi * lc + l]);
      mx = warp_max(mx);
      const float m_old = sm.m[qi];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int l = lane; l < lc; l += 32) {
        const float v = sm.s[qi * lc + l];
        const float e = v == -INFINITY ? 0.f : exp2f(v - m_new);
        sm.s[qi * lc + l] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float a = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
        sm.alpha[qi] = a;
        sm.den[qi] = sm.den[qi] * a + sum;
        sm.m[qi] = m_new;
      }
    }
    __syncthreads();
    accumulate<T>(sm.acc, sm.alpha, sm.s, vt, sm.red, q_n, dh, lc, n);  // ends past a barrier
  }
  const int D = p.H * dh;
  if (p.splits == 1) {
    T* out = static_cast<T*>(p.y);
    for (int e = threadIdx.x; e < e_n; e += kThreads) {
      const int qi = e / dh, d = e - qi * dh;
      const float den = sm.den[qi];
      out[(static_cast<int64_t>(b) * q_n + qi) * D + static_cast<int64_t>(h) * dh + d] =
          from_f<T>(den > 0.f ? sm.acc[e] / den : 0.f);
    }
    for (int qi = threadIdx.x; qi < q_n; qi += kThreads) {
      const float den = sm.den[qi];
      p.lse[(static_cast<int64_t>(b) * q_n + qi) * p.H + h] = den > 0.f ? (sm.m[qi] + log2f(den)) * kLn2 : -INFINITY;
    }
  } else {
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * p.splits + split;
    for (int e = threadIdx.x; e < e_n; e += kThreads) p.ws[slot * e_n + e] = sm.acc[e];
    const int64_t n_slots = static_cast<int64_t>(gridDim.x) * p.splits;
    for (int qi = threadIdx.x; qi < q_n; qi += kThreads) {
      p.ws_m[slot * q_n + qi] = sm.m[qi];
      p.ws_m[(n_slots + slot) * q_n + qi] = sm.den[qi];
    }
  }
}

// Merge the splits' partials of one (b, h): grid B*H.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_pool_combine_kernel(const __grid_constant__ AP p) {
  const int b = blockIdx.x / p.H, h = blockIdx.x - b * p.H;
  const int dh = p.Dh, q_n = p.Q, e_n = q_n * dh, D = p.H * dh;
  const int64_t n_slots = static_cast<int64_t>(gridDim.x) * p.splits;
  const int64_t slot0 = static_cast<int64_t>(blockIdx.x) * p.splits;
  for (int e = threadIdx.x; e < e_n + q_n; e += kThreads) {
    const int qi = e < e_n ? e / dh : e - e_n;
    float mx = -INFINITY;
    for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.ws_m[(slot0 + s) * q_n + qi]);
    float den = 0.f, acc = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float m = p.ws_m[(slot0 + s) * q_n + qi];
      if (m == -INFINITY) continue;
      const float w = exp2f(m - mx);
      den += w * p.ws_m[(n_slots + slot0 + s) * q_n + qi];
      if (e < e_n) acc += w * p.ws[(slot0 + s) * e_n + e];
    }
    if (e < e_n) {
      const int d = e - qi * dh;
      static_cast<T*>(p.y)[(static_cast<int64_t>(b) * q_n + qi) * D + static_cast<int64_t>(h) * dh + d] =
          from_f<T>(den > 0.f ? acc / den : 0.f);
    } else {
      p.lse[(static_cast<int64_t>(b) * q_n + qi) * p.H + h] = den > 0.f ? (mx + log2f(den)) * kLn2 : -INFINITY;
    }
  }
}

struct BwdSmem {
  float *q, *dout, *dq, *pm, *ds, *lse2, *delta, *red;
  void *kt, *vt;
};

__host__ __device__ inline size_t bwd_smem(int q_n, int dh, int lc, int esize, bool has_key, char* base,
                                           BwdSmem* out) {
  size_t off = 0;
  auto take = [&](size_t bytes) { char* p = base + off; off += align16(bytes); return p; };
  char* q = take(sizeof(float) * q_n * dh);
  char* dout = take(sizeof(float) * q_n * dh);
  char* dq = take(sizeof(float) * q_n * dh);
  char* pm = take(sizeof(float) * q_n * lc);
  char* ds = take(sizeof(float) * q_n * lc);
  char* lse2 = take(sizeof(float) * q_n);
  char* delta = take(sizeof(float) * q_n);
  char* red = take(sizeof(float) * kThreads);
  char* kt = take(static_cast<size_t>(esize) * lc * pad_row(dh, esize));
  char* vt = has_key ? take(static_cast<size_t>(esize) * lc * pad_row(dh, esize)) : kt;
  if (out != nullptr) {
    *out = BwdSmem{reinterpret_cast<float*>(q), reinterpret_cast<float*>(dout), reinterpret_cast<float*>(dq),
                   reinterpret_cast<float*>(pm), reinterpret_cast<float*>(ds), reinterpret_cast<float*>(lse2),
                   reinterpret_cast<float*>(delta), reinterpret_cast<float*>(red), kt, vt};
  }
  return off;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) attn_pool_bwd_kernel(const __grid_constant__ AP p) {
  MMK_DYNAMIC_SMEM(char, smem_raw);
  BwdSmem sm;
  bwd_smem(p.Q, p.Dh, p.lc, sizeof(T), p.has_key, smem_raw, &sm);
  T* kt = static_cast<T*>(sm.kt);
  T* vt = static_cast<T*>(sm.vt);
  const int b = blockIdx.x / p.H, h = blockIdx.x - b * p.H, split = blockIdx.y;
  const int dh = p.Dh, q_n = p.Q, lc = p.lc, e_n = q_n * dh, D = p.H * dh;
  const int pr = pad_row(dh, sizeof(T));
  const int64_t len = seq_len(p, b);
  // padded layout: every position of the row gets its dx (zeros past the length); packed: the sample's rows
  const int64_t span = p.cu != nullptr ? len : p.L;
  const int64_t t_begin = static_cast<int64_t>(split) * p.tps;
  const int64_t t_end = lmin(span, t_begin + p.tps);
  const int64_t xr = row0(p, b, p.sxb, p.sxl), kr = row0(p, b, p.skb, p.skl);
  const T* xb = static_cast<const T*>(p.x) + xr + static_cast<int64_t>(h) * dh;
  const T* kb = static_cast<const T*>(p.k) + kr + static_cast<int64_t>(h) * dh;
  // dx / dkey are contiguous in the layout of x: row stride D, sample stride L * D (padded)
  const int64_t yr = p.cu != nullptr ? p.cu[b] * D : static_cast<int64_t>(b) * p.L * D;
  T* dxb = static_cast<T*>(p.y) + yr + static_cast<int64_t>(h) * dh;
  T* dkb = p.has_key ? static_cast<T*>(p.dk) + yr + static_cast<int64_t>(h) * dh : nullptr;
  const T* qb = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.sqb + static_cast<int64_t>(h) * p.sqh;
  const T* dob = static_cast<const T*>(p.dout) + static_cast<int64_t>(b) * q_n * D + static_cast<int64_t>(h) * dh;
  const T* ob = static_cast<const T*>(p.out) + static_cast<int64_t>(b) * q_n * D + static_cast<int64_t>(h) * dh;
  for (int e = threadIdx.x; e < e_n; e += kThreads) {
    const int qi = e / dh, d = e - qi * dh;
    sm.q[e] = to_f(qb[qi * p.sqq + d]);
    sm.dout[e] = to_f(dob[static_cast<int64_t>(qi) * D + d]);
    sm.dq[e] = 0.f;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int qi = warp; qi < q_n; qi += kThreads / 32) {  // delta_q = <dO_q, O_q>, lse in log2 units
    float s = 0.f;
    for (int d = lane; d < dh; d += 32)
      s += to_f(dob[static_cast<int64_t>(qi) * D + d]) * to_f(ob[static_cast<int64_t>(qi) * D + d]);
    s = warp_sum(s);
    if (lane == 0) {
      sm.delta[qi] = s;
      sm.lse2[qi] = p.lse[(static_cast<int64_t>(b) * q_n + qi) * p.H + h] * kLog2e;
    }
  }
  __syncthreads();
  const float qscale = p.scale * kLog2e;
  const int per_row = dh / VEC;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += lc) {
    const int n = static_cast<int>(lmin(lc, t_end - t0));           // rows of this tile
    const int nv = static_cast<int>(lmax(0, lmin(n, len - t0)));  // valid ones
    if (nv > 0) {
      stage<T, VEC>(kt, kb, p.skl, t0, nv, lc, dh);
      if (p.has_key) stage<T, VEC>(vt, xb, p.sxl, t0, nv, lc, dh);
      __syncthreads();
      for (int i = threadIdx.x; i < q_n * lc; i += kThreads) {
        const int qi = i / lc, l = i - qi * lc;
        float pv = 0.f, dsv = 0.f;
        if (l < nv) {
          const float s = dot_row<T, VEC>(sm.q + qi * dh, kt + l * pr, dh) * qscale;
          pv = exp2f(s - sm.lse2[qi]);
          const float dp = dot_row<T, VEC>(sm.dout + qi * dh, vt + l * pr, dh);
          dsv = pv * (dp - sm.delta[qi]);
        }
        sm.pm[i] = pv;
        sm.ds[i] = dsv;
      }
      __syncthreads();
    }
    // dx (and dkey) rows of the tile: VEC columns per thread, 16-byte stores
    for (int i = threadIdx.x; i < n * per_row; i += kThreads) {
      const int l = i / per_row, c = (i - l * per_row) * VEC;
      float dv[VEC], dkv[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) { dv[j] = 0.f; dkv[j] = 0.f; }
      if (l < nv) {
        for (int qi = 0; qi < q_n; ++qi) {
          const float pw = sm.pm[qi * lc + l], dw = sm.ds[qi * lc + l] * p.scale;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            dv[j] += pw * sm.dout[qi * dh + c + j];
            dkv[j] += dw * sm.q[qi * dh + c + j];
          }
        }
      }
      const int64_t o = (t0 + l) * D + c;
      if (p.has_key) {
        store_f<T, VEC>(dxb + o, dv);
        store_f<T, VEC>(dkb + o, dkv);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dv[j] += dkv[j];
        store_f<T, VEC>(dxb + o, dv);
      }
    }
    if (nv > 0) accumulate<T>(sm.dq, nullptr, sm.ds, kt, sm.red, q_n, dh, lc, nv);  // ends past a barrier
  }
  // this split's dq partial (scaled), fp32: ws[split, b, qi, h*Dh + d]
  float* wsb = p.ws + (static_cast<int64_t>(split) * p.B + b) * q_n * D + static_cast<int64_t>(h) * dh;
  for (int e = threadIdx.x; e < e_n; e += kThreads) {
    const int qi = e / dh, d = e - qi * dh;
    wsb[static_cast<int64_t>(qi) * D + d] = sm.dq[e] * p.scale;
  }
}

}  // namespace

size_t smem_bytes(bool backward, int q_n, int dh, int lc, int esize, bool has_key) {
  return backward ? bwd_smem(q_n, dh, lc, esize, has_key, nullptr, nullptr)
                  : fwd_smem(q_n, dh, lc, esize, has_key, nullptr, nullptr);
}

int launch_fwd(DType dtype, bool vec, const AP& p, unsigned grid_x, unsigned grid_y, Stream stream) {
  const dim3 grid(grid_x, grid_y);
  int err = 0;
  MMK_DISPATCH_DTYPE(dtype, [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      const size_t smem = fwd_smem(p.Q, p.Dh, p.lc, sizeof(scalar_t), p.has_key, nullptr, nullptr);
      err = set_dynamic_smem(attn_pool_fwd_kernel<scalar_t, VEC>, smem);
      if (err == 0) MMK_LAUNCH((attn_pool_fwd_kernel<scalar_t, VEC>), grid, kThreads, smem, stream, p);
    });
    if (err == 0 && p.splits > 1) {
      MMK_LAUNCH((attn_pool_combine_kernel<scalar_t>), grid.x, kThreads, 0, stream, p);
    }
  });
  return err != 0 ? err : launch_error();
}

int launch_bwd(DType dtype, bool vec, const AP& p, unsigned grid_x, unsigned grid_y, Stream stream) {
  const dim3 grid(grid_x, grid_y);
  int err = 0;
  MMK_DISPATCH_DTYPE(dtype, [&] {
    MMK_DISPATCH_VEC(vec, [&] {
      const size_t smem = bwd_smem(p.Q, p.Dh, p.lc, sizeof(scalar_t), p.has_key, nullptr, nullptr);
      err = set_dynamic_smem(attn_pool_bwd_kernel<scalar_t, VEC>, smem);
      if (err == 0) MMK_LAUNCH((attn_pool_bwd_kernel<scalar_t, VEC>), grid, kThreads, smem, stream, p);
    });
  });
  return err != 0 ? err : launch_error();
}

}  // namespace mmk::ap
