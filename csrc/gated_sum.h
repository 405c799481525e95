// gated_sum: what its kernel file (gated_sum.cu) and its torch glue (gated_sum_ops.cpp) share.
#pragma once

#include "launch.h"

namespace mmk::gs {

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

// forward: a grid-stride loop of 256-thread blocks, at most `sms` x 16 of them
int launch_fwd(DType dtype, bool vec, bool feature, const Args& a, int sms, Stream stream);
// backward: one warp per row, kWarps rows per block
int launch_bwd(DType dtype, bool vec, bool feature, const Args& a, Stream stream);

}  // namespace mmk::gs
