// CPU emulation of the CUDA runtime subset csrc/hip/quant_matmul.cu uses, for tests/test_hip_emulation.py:
// each thread block runs as real CPU threads (one std::thread per GPU thread) with a block barrier for
// __syncthreads and per-warp (32-lane) barriers for __shfl_xor_sync; blocks run one after another, so
// `__shared__` can be a function-local static. Slow, exact, and only for small test shapes.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct emu_uint3 { unsigned x, y, z; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated launch error"; }

namespace emu {
constexpr int kWarp = 32;
struct Block {
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
  explicit Block(int n) : sync(n), lanes(n) {
    for (int w = 0; w < (n + kWarp - 1) / kWarp; ++w) warps.emplace_back(new std::barrier<>(kWarp));
  }
};
inline thread_local emu_uint3 tid, bid;
inline thread_local Block* block = nullptr;

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, threads;
  template <typename... Args>
  void operator()(Args... args) const {
    const int n = static_cast<int>(threads.x * threads.y * threads.z);
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n);
        std::vector<std::thread> pool;
        for (int t = 0; t < n; ++t)
          pool.emplace_back([&, t] {
            tid = {static_cast<unsigned>(t), 0, 0};
            bid = {bx, by, 0};
            block = &blk;
            kernel(args...);
          });
        for (auto& th : pool) th.join();
      }
  }
};
template <typename Kernel>
Launch<Kernel> launch(Kernel k, dim3 grid, dim3 threads) { return Launch<Kernel>{k, grid, threads}; }
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define FELIX_LAUNCH(kernel, grid, threads, stream) emu::launch(kernel, grid, threads)

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int mask, int width) {
  const int t = static_cast<int>(emu::tid.x), lane = t % width;
  auto& blk = *emu::block;
  auto& warp = *blk.warps[t / emu::kWarp];
  blk.lanes[t] = v;
  warp.arrive_and_wait();
  const float r = blk.lanes[t - lane + (lane ^ mask)];
  warp.arrive_and_wait();
  return r;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
