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
#include "common.cuh"

namespace mmk {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kMaxQDh = 8192;   // Q * Dh kept in shared memory (fp32)

struct AP {
  const void* x;
  const void* k;          // == x when no distinct key
  const void* q;
  const void* dout;       // backward
  const void* out;        // backward
  const int64_t* lengths; // padded layout, or nullptr
  const int64_t* cu;      // packed layout, or nullptr
  int64_t sxb, sxl, skb, skl;   // x / key strides (batch, token); unit stride along D
  int64_t sqb, sqq, sqh;        // query strides; sqb = 0 for a shared query
  int64_t L;              // padded length, or max_seqlen (packed)
  int64_t tps;            // tokens per split (a multiple of lc)
  int B, Q, H, Dh, lc, splits;
  float scale;
  bool has_key;
  void* y;                // forward: out [B, Q, D]; backward: dx (layout of x, contiguous)
  void* dk;               // backward: dkey
  float* lse;             // forward: [B, Q, H]; backward (read): same
  float* ws;              // forward: partial acc [B*H, splits, Q*Dh]; backward: dq [splits, B, Q, H*Dh]
  float* ws_m;            // forward: partial m / den [B*H, splits, Q] each (den at + B*H*splits*Q)
};

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

// ---- host ---------------------------------------------------------------------------------------

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
  return {static_cast<int64_t>(fwd_smem(qi, di, lc, ei, has_key, nullptr, nullptr)),
          static_cast<int64_t>(bwd_smem(qi, di, lc, ei, has_key, nullptr, nullptr))};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& key,
                                                           const at::Tensor& query,
                                                           const std::optional<at::Tensor>& lengths,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           int64_t max_seqlen, double scale) {
  MMK_DEVICE_GUARD(x.device());
  Prepared r = prepare(x, key, query, lengths, cu_seqlens, max_seqlen, scale, "cuda_attention_pool_fwd");
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
  const dim3 grid(static_cast<unsigned>(r.B * p.H), static_cast<unsigned>(p.splits));
  MMK_DISPATCH_FLOATS(x.scalar_type(), "cuda_attention_pool_fwd", [&] {
    MMK_DISPATCH_VEC(r.vec, [&] {
      const size_t smem = fwd_smem(p.Q, p.Dh, p.lc, sizeof(scalar_t), p.has_key, nullptr, nullptr);
      set_dynamic_smem(attn_pool_fwd_kernel<scalar_t, VEC>, smem, "cuda_attention_pool_fwd");
      MMK_LAUNCH((attn_pool_fwd_kernel<scalar_t, VEC>), grid, kThreads, smem, p);
    });
    if (p.splits > 1) {
      MMK_LAUNCH((attn_pool_combine_kernel<scalar_t>), grid.x, kThreads, 0, p);
    }
  });
  return {out, lse};
}

std::vector<at::Tensor> attention_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                const std::optional<at::Tensor>& key, const at::Tensor& query,
                                                const std::optional<at::Tensor>& lengths,
                                                const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                                const at::Tensor& lse, int64_t max_seqlen, double scale) {
  MMK_DEVICE_GUARD(x.device());
  Prepared r = prepare(x, key, query, lengths, cu_seqlens, max_seqlen, scale, "cuda_attention_pool_bwd");
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
  const dim3 grid(static_cast<unsigned>(r.B * p.H), static_cast<unsigned>(p.splits));
  MMK_DISPATCH_FLOATS(x.scalar_type(), "cuda_attention_pool_bwd", [&] {
    MMK_DISPATCH_VEC(r.vec, [&] {
      const size_t smem = bwd_smem(p.Q, p.Dh, p.lc, sizeof(scalar_t), p.has_key, nullptr, nullptr);
      set_dynamic_smem(attn_pool_bwd_kernel<scalar_t, VEC>, smem, "cuda_attention_pool_bwd");
      MMK_LAUNCH((attn_pool_bwd_kernel<scalar_t, VEC>), grid, kThreads, smem, p);
    });
  });
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
