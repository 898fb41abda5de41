// A CPU emulation of the few CUDA features fastcl's kernels use, so that the kernels' own source
// (csrc/info_nce_kernels.cuh, csrc/tile.cuh) runs and is tested on machines without a GPU.
//
// One block runs at a time, as THREADS std::threads. __syncthreads and __syncwarp are barriers;
// shuffles exchange through per-warp slots. A WMMA fragment holds its whole 16x16 tile in every
// lane; load_matrix_sync honours row/column-major layouts and store_matrix_sync is done by lane 0,
// so a wrong layout or pitch gives wrong numbers here too (a missing barrier may or may not).
// Hopper's wgmma (fastcl::wg) is emulated from the PTX ISA's definitions: matrix descriptors
// decoded bit by bit, K-major operands read through the no-swizzle core-matrix layout, each
// thread's accumulators in the m64nNk16 D-fragment layout; the MMA runs when the thread waits
// for it (so a buffer overwritten too early gives wrong numbers), and it aborts on a wgmma with
// no wgmma.fence before it, on uncommitted or never-waited MMAs, and on reading shared memory
// that a thread stored without fence.proxy.async after it.
// It checks the kernels' logic: indexing, masking, data flow through shared memory, the math,
// and the alignment of 16-byte accesses and WMMA operands. It says nothing about timing, coalescing, bank
// conflicts or register pressure.
#pragma once

#ifndef FASTCL_EMULATE
#define FASTCL_EMULATE 1
#endif

#include <cuda_bf16.h>  // host-usable conversions
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
#define FASTCL_NOTE_STORE16(p) emu::note_store16(p)

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

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulated CUDA: %s (thread %u of block %u)\n", what, threadIdx.x, blockIdx.x);
  std::abort();
}

// The kernels' `extern __shared__` block (run_kernels.cpp sets these), and, per 16-byte slot of
// it, whether a thread stored there with st16 and has not yet run fence.proxy.async.
inline unsigned char* smem_base = nullptr;
inline size_t smem_size = 0;
inline std::unique_ptr<std::atomic<unsigned char>[]> slot_unfenced;
inline thread_local std::vector<size_t> my_unfenced;
inline void set_smem(unsigned char* base, size_t size) {
  smem_base = base;
  smem_size = size;
  slot_unfenced = std::make_unique<std::atomic<unsigned char>[]>(size / 16);
  for (size_t i = 0; i < size / 16; ++i) slot_unfenced[i] = 0;
}
inline void note_store16(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (!smem_base || c < smem_base || c >= smem_base + smem_size) return;  // global memory
  const size_t slot = (size_t)(c - smem_base) / 16;
  slot_unfenced[slot] = 1;
  my_unfenced.push_back(slot);
}

// Runs body() as a grid of `grid` blocks of `threads` threads, one block after the other.
template <typename Body>
void launch(unsigned grid, unsigned threads, Body body) {
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    for (size_t i = 0; slot_unfenced && i < smem_size / 16; ++i) slot_unfenced[i] = 0;  // a new block's smem
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

// Hopper's warpgroup MMA, as tile.cuh's fastcl::wg uses it (PTX ISA 9.7.15).
namespace fastcl {
namespace wg {
inline thread_local bool fenced = false;  // a wgmma.fence since the last wait
inline thread_local std::vector<std::function<void()>> issued, committed;

inline uint32_t smem_addr(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < emu::smem_base || c >= emu::smem_base + emu::smem_size) emu::fail("wgmma operand outside shared memory");
  return (uint32_t)(c - emu::smem_base);
}
inline void fence() { fenced = true; }
inline void commit() {
  for (auto& f : issued) committed.push_back(std::move(f));
  issued.clear();
}
inline void wait_all() {  // wgmma.wait_group 0: every committed MMA of this thread completes
  if (!issued.empty()) emu::fail("wgmma waited for but never committed");
  for (auto& f : committed) f();
  committed.clear();
  fenced = false;
}
inline void fence_proxy() {
  for (size_t slot : emu::my_unfenced) emu::slot_unfenced[slot] = 0;
  emu::my_unfenced.clear();
}
inline void fence_operands(float (&)[16]) {}

// Element (row, k) of a K-major operand without swizzling: core matrices of 8 rows x 16 bytes
// (the canonical layout ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO)) in elements, T = 16 / size).
template <typename T> float operand(uint64_t desc, int row, int k) {
  if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) emu::fail("wgmma descriptor: only no-swizzle, base offset 0 emulated");
  if (((desc >> 14) & 3) || ((desc >> 30) & 3) || ((desc >> 46) & 7) || ((desc >> 52) & 0x3FF))
    emu::fail("wgmma descriptor: reserved bits set");
  const size_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
  const size_t off = start + (row / 8) * sbo + (row % 8) * 16 + (k / 8) * lbo + (k % 8) * sizeof(T);
  if (off + sizeof(T) > emu::smem_size) emu::fail("wgmma operand past the end of shared memory");
  if (emu::slot_unfenced[off / 16]) emu::fail("wgmma read shared memory stored without fence.proxy.async after it");
  T x;
  std::memcpy(&x, emu::smem_base + off, sizeof(T));
  return emu::to_float(x);
}

// d += A (64 x 16) @ B (N x 16)^T; this thread's accumulators: d[4j + v] is
// D[16 w + lane / 4 + 8 (v / 2)][8 j + 2 (lane % 4) + v % 2], w its warp in the warpgroup.
template <typename T, int N> void mma_m64nNk16(float (&d)[N / 2], uint64_t a, uint64_t b) {
  if (!fenced) emu::fail("wgmma.mma_async without wgmma.fence before it");
  const unsigned t = threadIdx.x & 127, w = t >> 5, lane = t & 31;
  issued.push_back([&d, a, b, w, lane] {
    for (int j = 0; j < N / 8; ++j)
      for (int v = 0; v < 4; ++v) {
        const int m = 16 * w + lane / 4 + 8 * (v / 2), n = 8 * j + 2 * (lane % 4) + v % 2;
        float acc = d[4 * j + v];
        for (int k = 0; k < 16; ++k) acc += operand<T>(a, m, k) * operand<T>(b, n, k);
        d[4 * j + v] = acc;
      }
  });
}
template <typename T> void mma_m64n32k16(float (&d)[16], uint64_t a, uint64_t b) { mma_m64nNk16<T, 32>(d, a, b); }
}  // namespace wg
}  // namespace fastcl
