// A CPU stand-in for the CUDA execution model, so the kernels of csrc/ can be tested on machines
// without a GPU (tests/test_cuda.py builds csrc/ with g++ and MMK_EMULATE defined, as the
// `mmkernels_emu` op library on CPU tensors).
//
// Every CUDA thread of a block is a host thread; blocks run one after another. __syncthreads is a
// std::barrier over the block, warp shuffles exchange through a per-warp buffer between two
// barriers of the warp, and threads that return early drop out of both (as exited threads do on
// the GPU). Barriers count arrivals, not call sites: threads waiting at different barriers can
// pair up here, so not every divergent barrier is caught; one that leaves threads waiting hangs the
// block, which a watchdog turns into an abort with a message. What it cannot show: timing,
// races between threads without a barrier, and the exact results of the approximate intrinsics
// (host libm stands in for __expf, tanh.approx, rsqrtf).
#pragma once

#include <algorithm>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif
#define __global__
#define __launch_bounds__(...)
#define __grid_constant__
#ifndef __forceinline__
#define __forceinline__ inline
#endif

namespace mmk {
namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct Warp {
  std::unique_ptr<std::barrier<>> bar;
  float buf[32];
};

struct AlignedFree {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<Warp> warps;
  // exactly the bytes the launch asked for, so AddressSanitizer (MMKERNELS_CUDA_EMULATE=asan)
  // reports a read or write past them
  std::unique_ptr<unsigned char[], AlignedFree> smem;
};

inline thread_local Dim3 thread_idx, block_idx;
inline thread_local Block* block = nullptr;
inline Dim3 block_dim, grid_dim;
inline std::mutex atomic_mutex;
constexpr int kWatchdogSeconds = 120;

inline Warp& my_warp() { return block->warps[thread_idx.x / 32]; }

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), Dim3 grid, Dim3 threads, size_t smem, Args... args) {
  if (threads.y != 1 || threads.z != 1) {
    std::fprintf(stderr, "mmkernels CUDA emulator: 1-D blocks only (got %u x %u x %u threads)\n", threads.x, threads.y,
                 threads.z);
    std::abort();
  }
  grid_dim = grid;
  block_dim = threads;
  const unsigned n = threads.x;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.bar = std::make_unique<std::barrier<>>(n);
        b.warps.resize((n + 31) / 32);
        for (unsigned w = 0; w < b.warps.size(); ++w)
          b.warps[w].bar = std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w));
        b.smem.reset(static_cast<unsigned char*>(::operator new[](std::max<size_t>(smem, 1), std::align_val_t(16))));
        std::memset(b.smem.get(), 0xA5, smem);  // garbage, as uninitialised shared memory
        std::mutex done_mutex;
        std::condition_variable done_cv;
        unsigned done = 0;
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          pool.emplace_back([&, t] {
            thread_idx = Dim3(t);
            block_idx = Dim3(bx, by, bz);
            block = &b;
            kernel(args...);
            my_warp().bar->arrive_and_drop();
            b.bar->arrive_and_drop();
            std::lock_guard<std::mutex> g(done_mutex);
            ++done;
            done_cv.notify_one();
          });
        {
          // watchdog: a barrier or shuffle that not every live thread reaches hangs the block
          // (on a GPU: a hang or undefined behaviour); fail loudly instead of waiting forever
          std::unique_lock<std::mutex> lk(done_mutex);
          if (!done_cv.wait_for(lk, std::chrono::seconds(kWatchdogSeconds), [&] { return done == n; })) {
            std::fprintf(stderr,
                         "mmkernels CUDA emulator: block (%u, %u, %u) of %u threads did not finish in %d s: a "
                         "__syncthreads or warp shuffle is not reached by every thread; aborting\n",
                         bx, by, bz, n, kWatchdogSeconds);
            std::fflush(stderr);
            std::abort();
          }
        }
        for (auto& th : pool) th.join();
      }
}

inline unsigned char* dynamic_smem() { return block->smem.get(); }

}  // namespace emu

#define threadIdx (::mmk::emu::thread_idx)
#define blockIdx (::mmk::emu::block_idx)
#define blockDim (::mmk::emu::block_dim)
#define gridDim (::mmk::emu::grid_dim)
using dim3 = emu::Dim3;

inline void __syncthreads() { emu::block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::my_warp().bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::Warp& w = emu::my_warp();
  const unsigned lane = threadIdx.x & 31;
  w.buf[lane] = v;
  w.bar->arrive_and_wait();
  const float r = w.buf[lane ^ static_cast<unsigned>(lane_mask)];
  w.bar->arrive_and_wait();
  return r;
}

inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> g(emu::atomic_mutex);
  const float old = *p;
  *p = old + v;
  return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::max;
using std::min;

}  // namespace mmk

#define MMK_LAUNCH(KERNEL, GRID, BLOCK, SMEM, STREAM, ...) \
  ((void)(STREAM), ::mmk::emu::launch(KERNEL, ::mmk::emu::Dim3(GRID), ::mmk::emu::Dim3(BLOCK), SMEM, __VA_ARGS__))
#define MMK_DYNAMIC_SMEM(TYPE, NAME) TYPE* NAME = reinterpret_cast<TYPE*>(::mmk::emu::dynamic_smem())
