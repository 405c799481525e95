// What a kernel file (<op>.cu) and its torch glue (<op>_ops.cpp) share: plain C++, no torch and
// no CUDA headers, so the kernel files compile without torch's headers.
#pragma once

#include <cstdint>

namespace mmk {

// the I/O dtypes of the kernels (the glue maps at::ScalarType onto these)
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// the stream a launch is queued on: the glue's current cudaStream_t (the emulator ignores it)
using Stream = void*;

// A kernel file's launch functions return 0, or the CUDA error of the launch (or of opting a
// kernel into more dynamic shared memory); the glue turns a nonzero one into an exception.

}  // namespace mmk
