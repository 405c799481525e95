// attention_pool: what its kernel file (attention_pool.cu) and its torch glue
// (attention_pool_ops.cpp) share.
#pragma once

#include <cstddef>

#include "launch.h"

namespace mmk::ap {

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

// Dynamic shared memory per block of the forward (or backward) kernel, bytes.
size_t smem_bytes(bool backward, int q_n, int dh, int lc, int esize, bool has_key);
// forward: grid (B * H, splits), then the merge of the splits when there are several
int launch_fwd(DType dtype, bool vec, const AP& p, unsigned grid_x, unsigned grid_y, Stream stream);
// backward: grid (B * H, splits)
int launch_bwd(DType dtype, bool vec, const AP& p, unsigned grid_x, unsigned grid_y, Stream stream);

}  // namespace mmk::ap
