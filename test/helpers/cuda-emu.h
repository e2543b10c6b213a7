// A CPU emulation of the parts of the CUDA execution model that the elementwise and row kernels use, so that their
// generated sources (src/backends/cuda/kernels) can be compiled with g++ and run without a GPU (test/cuda-emulated.test.ts):
// one std::thread per CUDA thread, blocks one after another; warp shuffles through a per-warp exchange and barrier;
// __syncthreads as a block barrier; __shared__ arrays shared by the threads of the running block. Not emulated:
// tensor-core instructions (mma, ldmatrix, wgmma), cp.async, the memory model beyond sequential consistency.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
#define __launch_bounds__(...)

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
// the explicitly rounded operations are the plain IEEE ones (compile with -ffp-contract=off)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline void __threadfence() {}

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

struct EmuWarp {
  std::barrier<> bar{32};
  double slot[32];
};
inline thread_local EmuWarp* emuWarp = nullptr;
inline thread_local std::barrier<>* emuBlock = nullptr;

template <class T> T emuShuffle(T v, int from) {
  int lane = threadIdx.x % 32;
  emuWarp->slot[lane] = (double)v;
  emuWarp->bar.arrive_and_wait();
  T r = (T)emuWarp->slot[from];
  emuWarp->bar.arrive_and_wait();
  return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int m) { return emuShuffle(v, (threadIdx.x % 32) ^ m); }
template <class T> T __shfl_down_sync(unsigned, T v, int m) {
  int lane = threadIdx.x % 32;
  T r = emuShuffle(v, lane + m < 32 ? lane + m : lane);
  return r;
}
template <class T> T __shfl_sync(unsigned, T v, int src) { return emuShuffle(v, src % 32); }
inline void __syncthreads() { emuBlock->arrive_and_wait(); }
template <class T> T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> T atomicCAS(T* p, T cmp, T v) { __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return cmp; }
template <class T> T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

/** Runs kernel() over a 1-D grid of 1-D blocks: a block's threads at once (one std::thread each), blocks in turn. */
template <class F> void emuLaunch(unsigned grid, unsigned block, F kernel, unsigned gridY = 1) {
  gridDim.x = grid;
  gridDim.y = gridY;
  blockDim.x = block;
  for (unsigned b = 0; b < grid * gridY; b++) {
    std::vector<std::unique_ptr<EmuWarp>> warps;
    for (unsigned w = 0; w < (block + 31) / 32; w++) warps.emplace_back(new EmuWarp());
    std::barrier<> blockBarrier((std::ptrdiff_t)block);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; t++) {
      threads.emplace_back([&, b, t] {
        blockIdx.x = b % grid;
        blockIdx.y = b / grid;
        threadIdx.x = t;
        emuWarp = warps[t / 32].get();
        emuBlock = &blockBarrier;
        kernel();
      });
    }
    for (auto& t : threads) t.join();
  }
}
