// norm_concat: what its kernel file (norm_concat.cu) and its torch glue (norm_concat_ops.cpp) share.
#pragma once

#include <cstddef>

#include "launch.h"

namespace mmk::nc {

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

// forward: grid (row blocks of kWarps rows, modalities of p), kWarps warps per block
int launch_fwd(DType dtype, bool vec, bool cached, const Params& p, unsigned grid_x, unsigned grid_y, Stream stream);
// backward: grid (blocks of rows_per_block rows, modalities of p); `smem` bytes of dynamic shared
// memory (checked against the GPU's limit by the caller); min_blocks: 1 or 2 (see the kernel)
int launch_bwd(DType dtype, bool vec, bool cached, int min_blocks, const Params& p, int64_t rows_per_block,
               float* dw_part, float* db_part, int64_t part_stride, unsigned grid_x, unsigned grid_y, size_t smem,
               Stream stream);

}  // namespace mmk::nc
