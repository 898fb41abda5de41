// A CPU emulation of the few CUDA features fastcl's kernels use, so that the kernels' own source
// (csrc/info_nce_kernels.cuh, csrc/tile.cuh) runs and is tested on machines without a GPU.
//
// One block runs at a time, as THREADS std::threads. __syncthreads and __syncwarp are barriers;
// shuffles exchange through per-warp slots. A WMMA fragment holds its whole 16x16 tile in every
// lane; load_matrix_sync honours row/column-major layouts and store_matrix_sync is done by lane 0,
// so a wrong layout or pitch gives wrong numbers here too (a missing barrier may or may not).
// It checks the kernels' logic: indexing, masking, data flow through shared memory, the math,
// and the alignment of 16-byte accesses and WMMA operands. It says nothing about timing, coalescing, bank
// conflicts or register pressure.
#pragma once

#ifndef FASTCL_EMULATE
#define FASTCL_EMULATE 1
#endif

#include <cuda_bf16.h>  // host-usable conversions
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

// The CUDA headers define these as attributes for host compilers; here they mean nothing.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

// 16-byte accesses (tile.cuh's ld16/st16) fault on a GPU when misaligned: here they abort.
#define FASTCL_CHECK_ALIGN16(p)                                                            \
  do {                                                                                     \
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {                                        \
      std::fprintf(stderr, "misaligned 16-byte access at %p (%s:%d)\n", (const void*)(p), \
                   __FILE__, __LINE__);                                                    \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)

struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 gridDim;

namespace emu {
constexpr int kMaxThreads = 1024;
inline std::barrier<>* block_barrier = nullptr;
inline std::unique_ptr<std::barrier<>> warp_barrier[kMaxThreads / 32];
inline float shuffle_slot[kMaxThreads / 32][32];

// Runs body() as a grid of `grid` blocks of `threads` threads, one block after the other.
template <typename Body>
void launch(unsigned grid, unsigned threads, Body body) {
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(threads);
    block_barrier = &bar;
    for (unsigned w = 0; w < threads / 32; ++w) warp_barrier[w] = std::make_unique<std::barrier<>>(32);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        body();
      });
    for (auto& th : pool) th.join();
  }
}

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier[threadIdx.x >> 5]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  emu::shuffle_slot[w][lane] = v;
  __syncwarp();
  const float r = emu::shuffle_slot[w][lane ^ lane_mask];
  __syncwarp();
  return r;
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation covers 16x16x16 fragments");
  float v[16][16];
};

template <typename Use, typename T, typename L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

// What CUDA requires of a WMMA load/store: a 256-bit aligned pointer and a pitch that is a
// multiple of 16 bytes. A violation is undefined behaviour on a GPU: here it aborts.
template <typename T> void check_wmma_operand(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
    std::fprintf(stderr, "WMMA operand at %p with pitch %u elements breaks the 32-byte/16-byte rule\n",
                 (const void*)p, ldm);
    std::abort();
  }
}

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_wmma_operand(p, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[i][j] = emu::to_float(std::is_same_v<L, col_major> ? p[i + j * ldm] : p[i * ldm + j]);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i][j];
      for (int k = 0; k < 16; ++k) acc += a.v[i][k] * b.v[k][j];  // products exact in fp32
      out[i][j] = acc;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_wmma_operand(p, ldm);
  if ((threadIdx.x & 31) != 0) return;  // one writer; the kernel's own barrier must publish it
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[layout == mem_col_major ? i + j * ldm : i * ldm + j] = f.v[i][j];
}
}  // namespace wmma
}  // namespace nvcuda
