// Tile math shared by the fused InfoNCE kernels (forward and both backward launches).
//
// One block = 256 threads (8 warps) works on a BM x BN tile of S = s * A @ B^T.
// 16-bit inputs go through the tensor cores: WMMA 16x16x16 (sm_80+), or, in code built for
// sm_90a (Hopper), the score tile on warpgroup MMA (wgmma), both with fp32 accumulators. fp32
// inputs use plain fp32 FMAs, so that fp32 results are as precise as torch's default
// (non-TF32) matmul, the code fastcl replaces.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>  // make_uint4 (nvcc includes it anyway; the CPU emulation does not)
#include <vector_types.h>
#ifndef FASTCL_EMULATE  // csrc/emulate/cuda_emu.h provides nvcuda::wmma and wg:: on the CPU
#include <mma.h>
#endif

// The Hopper path: wgmma exists only in code built for sm_90a (TORCH_CUDA_ARCH_LIST "9.0a"). The
// CPU emulation always has it (cuda_emu.h emulates the instructions from the PTX ISA's layouts).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FASTCL_EMULATE)
#define FASTCL_WGMMA 1
#endif

#include <cstdint>

namespace fastcl {

constexpr int BM = 64;        // rows of A per block
constexpr int BN = 64;        // rows of B per tile
constexpr int BK = 32;        // D-chunk of the score dot
constexpr int THREADS = 256;  // 8 warps
constexpr int LDK = BK + 8;   // pitches (elements): padded against bank conflicts, and keeping
constexpr int LDS = BN + 4;   // every 16-row / 16-column WMMA pointer 32-byte aligned
constexpr int LDG = BN + 8;
constexpr float LOG2E = 1.4426950408889634f;
// Finite stand-in for -inf (running maxima): keeps (x - max) free of inf - inf = NaN. fp32's
// lowest (-FLT_MAX), below every finite logit: -1e30 once was, and logits under it (scale > 1e30,
// or features of norm ~1e15) left it the row max, so each exp2 underflowed and the loss was -inf.
constexpr float NEG = -3.40282347e+38f;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// Global -> shared tile copies in 16-byte pieces (VEC elements of a row).
// ---------------------------------------------------------------------------------------------
template <typename T> constexpr int vec_elems() { return 16 / (int)sizeof(T); }

// Every 16-byte access goes through these two: on a GPU a misaligned one faults, and the CPU
// emulation (which defines FASTCL_CHECK_ALIGN16) checks the address instead.
__device__ __forceinline__ uint4 ld16(const void* p) {
#ifdef FASTCL_CHECK_ALIGN16
  FASTCL_CHECK_ALIGN16(p);
#endif
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void st16(void* p, uint4 v) {
#ifdef FASTCL_CHECK_ALIGN16
  FASTCL_CHECK_ALIGN16(p);
#endif
#ifdef FASTCL_NOTE_STORE16  // the emulation tracks stores that wgmma may read (fence_proxy)
  FASTCL_NOTE_STORE16(p);
#endif
  *reinterpret_cast<uint4*>(p) = v;
}

// Whether a [rows, cols] row-major matrix can be read in 16-byte loads: its rows a whole number
// of pieces and its base 16-byte aligned (then every piece is). Otherwise (odd D, a view at an odd
// offset) each piece is gathered element by element.
template <typename T> __device__ __forceinline__ bool vec_ok(const T* p, int64_t cols) {
  return cols % vec_elems<T>() == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// The piece at row gr, columns [gc, gc + VEC) of src, zero (all-zero bits: +0 in every dtype)
// outside the matrix. With vec, a piece is wholly inside or wholly outside (cols % VEC == 0).
template <typename T>
__device__ __forceinline__ uint4 fetch_piece(const T* src, int64_t gr, int64_t rows, int64_t gc,
                                             int64_t cols, bool vec) {
  if (vec) {
    if (gr < rows && gc < cols) return ld16(src + gr * cols + gc);
    return make_uint4(0u, 0u, 0u, 0u);
  }
  uint32_t w[4];
  if constexpr (sizeof(T) == 2) {  // raw bits: no conversion, so the piece is the data
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = gc + 2 * i;
      const uint32_t lo = (gr < rows && c < cols) ? s[gr * cols + c] : 0u;
      const uint32_t hi = (gr < rows && c + 1 < cols) ? s[gr * cols + c + 1] : 0u;
      w[i] = lo | (hi << 16);  // little-endian: the lower address is the lower half
    }
  } else {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (gr < rows && gc + i < cols) ? s[gr * cols + gc + i] : 0u;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// An R x C tile (rows [r0, r0 + R), columns [c0, c0 + C)) held in registers between fetch() and
// put(): the score loop fetches the next D-chunk before working on this one, so that its global
// loads are in flight meanwhile. Which piece thread t holds (slots g = t, t + THREADS, ...):
//  - CORE false: consecutive threads, consecutive pieces of a row (coalesced);
//  - CORE true (the wgmma path): 8 consecutive threads, one piece column of 8 consecutive rows,
//    so that their stores to the core-matrix layout (put_core) are 128 contiguous bytes (no bank
//    conflicts); a warp still reads whole 16 * C / VEC-byte row segments of 8 rows.
// put(dst, ld) writes row-major: dst + r * ld must stay 16-byte aligned (ld * sizeof(T) a
// multiple of 16).
template <typename T, int R, int C, bool CORE = false> struct Stage {
  static constexpr int VEC = vec_elems<T>(), PR = C / VEC, PER = R * PR / THREADS;
  static_assert(C % VEC == 0 && (R * PR) % THREADS == 0, "whole pieces, evenly over the threads");
  static_assert(!CORE || R % 8 == 0, "whole 8-row core matrices");
  uint4 v[PER];
  __device__ __forceinline__ static void where(int g, int& r, int& c) {
    if constexpr (CORE) {
      r = g % 8 + 8 * (g / (8 * PR));
      c = (g / 8) % PR * VEC;
    } else {
      r = g / PR;
      c = (g % PR) * VEC;
    }
  }
  __device__ __forceinline__ void fetch(const T* src, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                        bool vec) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      int r, c;
      where(threadIdx.x + p * THREADS, r, c);
      v[p] = fetch_piece(src, r0 + r, rows, c0 + c, cols, vec);
    }
  }
  __device__ __forceinline__ void put(T* dst, int ld) const {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      int r, c;
      where(threadIdx.x + p * THREADS, r, c);
      st16(dst + r * ld + c, v[p]);
    }
  }
  // The layout wgmma reads without swizzling (K-major "core matrices" of 8 rows x 16 bytes,
  // stored as 128 contiguous bytes): piece (r, c) at dst + (c / VEC) * R * VEC + r * VEC, i.e.
  // [C / VEC][R][VEC]. Between row groups 128 bytes (the descriptor's SBO), between piece
  // columns R * 16 bytes (its LBO).
  __device__ __forceinline__ void put_core(T* dst) const {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      int r, c;
      where(threadIdx.x + p * THREADS, r, c);
      st16(dst + (c / VEC) * R * VEC + r * VEC, v[p]);
    }
  }
};

// The same copy straight through (a tile too large to hold in registers: the backward's slab).
template <typename T, int R, int C>
__device__ __forceinline__ void copy_tile(T* dst, int ld, const T* src, int64_t r0, int64_t rows, int64_t c0,
                                          int64_t cols, bool vec) {
  constexpr int VEC = vec_elems<T>(), PR = C / VEC;
  static_assert(C % VEC == 0 && (R * PR) % THREADS == 0, "whole pieces, evenly over the threads");
#pragma unroll 4
  for (int g = threadIdx.x; g < R * PR; g += THREADS) {
    const int r = g / PR, c = (g % PR) * VEC;
    st16(dst + r * ld + c, fetch_piece(src, r0 + r, rows, c0 + c, cols, vec));
  }
}

// ---------------------------------------------------------------------------------------------
// Score: a BM x BN fp32 tile of A_chunk @ B_chunk^T accumulated over the D-chunks.
// ---------------------------------------------------------------------------------------------
// The score accumulators. Each kind says how score_tile lays out its chunk buffers (CORE: the
// core-matrix layout of Stage::put_core, else row-major with pitch LDK), issues the MMAs of a
// chunk (issue), makes the buffers it filled visible to them (published, before the barrier),
// and waits for them (wait). Synchronous kinds compute in issue().
template <typename T> struct Score {  // 16-bit: warp w owns rows 16*(w%4).., columns 32*(w/4)..
  static constexpr bool CORE = false;
  __device__ static void published() {}
  __device__ void wait() {}
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];
  __device__ void zero() {
    nvcuda::wmma::fill_fragment(c[0], 0.f);
    nvcuda::wmma::fill_fragment(c[1], 0.f);
  }
  // As: [BM][LDK], Bs: [BN][LDK] (the B rows; read as B^T in column-major order)
  __device__ void issue(const T* As, const T* Bs) {
    using namespace nvcuda;
    const int w = threadIdx.x >> 5, r0 = (w & 3) * 16, c0 = (w >> 2) * 32;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, As + r0 * LDK + kk, LDK);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, Bs + (c0 + 16 * j) * LDK + kk, LDK);
        wmma::mma_sync(c[j], a, b, c[j]);
      }
    }
  }
  __device__ void store(float* S) {  // S: [BM][LDS]
    const int w = threadIdx.x >> 5, r0 = (w & 3) * 16, c0 = (w >> 2) * 32;
    nvcuda::wmma::store_matrix_sync(S + r0 * LDS + c0, c[0], LDS, nvcuda::wmma::mem_row_major);
    nvcuda::wmma::store_matrix_sync(S + r0 * LDS + c0 + 16, c[1], LDS, nvcuda::wmma::mem_row_major);
  }
};

template <> struct Score<float> {  // thread t owns rows 4*(t/16)+i, columns (t%16)+16*j
  static constexpr bool CORE = false;
  __device__ static void published() {}
  __device__ void wait() {}
  float c[4][4];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = 0.f;
  }
  __device__ void issue(const float* As, const float* Bs) {
    const int r0 = (threadIdx.x >> 4) * 4, c0 = threadIdx.x & 15;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[(r0 + i) * LDK + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[(c0 + 16 * j) * LDK + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }
  __device__ void store(float* S) {
    const int r0 = (threadIdx.x >> 4) * 4, c0 = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[(r0 + i) * LDS + c0 + 16 * j] = c[i][j];
  }
};

// The accumulator kind of score_tile<T, WG>: Score<T>, or ScoreWG<T> for WG where wgmma exists
// (elsewhere score_tile traps before using it).
template <typename T, bool WG> struct ScoreOf { using type = Score<T>; };

// ---------------------------------------------------------------------------------------------
// Hopper (sm_90a): the score tile on warpgroup MMA. Each of the block's two warpgroups computes
// 32 columns of the 64 x 64 tile with wgmma.m64n32k16, both operands read by the tensor cores
// straight from shared memory (no fragment loads through registers), asynchronously: the next
// chunk's stores to the other buffer proceed meanwhile. Operand layout: PTX ISA, "Shared Memory
// Matrix Layout", K-major without swizzling; accumulator layout: "Register Fragments", m64nNk16 D.
// ---------------------------------------------------------------------------------------------
#if defined(FASTCL_WGMMA) && !defined(FASTCL_EMULATE)
namespace wg {
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Orders this thread's accumulator accesses before the wgmma that follow.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Shared memory written by ordinary stores is seen by the tensor cores (the async proxy) only
// after this fence in each writing thread, followed by the barrier.
__device__ __forceinline__ void fence_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMA.
__device__ __forceinline__ void fence_operands(float (&d)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define FASTCL_WGMMA_M64N32K16(TYPE)                                                                   \
  asm volatile(                                                                                         \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                     \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "                                   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),           \
        "+f"(d[15])                                                                                     \
      : "l"(a), "l"(b), "r"(1))
// d += A (64 x 16, descriptor a) @ B (32 x 16, descriptor b)^T, both K-major.
template <typename T> __device__ __forceinline__ void mma_m64n32k16(float (&d)[16], uint64_t a, uint64_t b);
template <> __device__ __forceinline__ void mma_m64n32k16<__nv_bfloat16>(float (&d)[16], uint64_t a, uint64_t b) {
  FASTCL_WGMMA_M64N32K16("bf16");
}
template <> __device__ __forceinline__ void mma_m64n32k16<__half>(float (&d)[16], uint64_t a, uint64_t b) {
  FASTCL_WGMMA_M64N32K16("f16");
}
#undef FASTCL_WGMMA_M64N32K16
}  // namespace wg
#endif

#ifdef FASTCL_WGMMA
namespace wg {
// Matrix descriptor of a K-major operand without swizzling at p (16-byte aligned): bits 0-13 the
// start address, 16-29 LBO (between core matrices along K), 32-45 SBO (between 8-row groups), all
// in 16-byte units; base offset and swizzle mode (bits 49-51, 62-63) zero.
__device__ __forceinline__ uint64_t desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32);
}
}  // namespace wg

template <typename T> struct ScoreWG {  // warpgroup g = threadIdx.x / 128 owns columns 32g .. 32g+31
  static constexpr bool CORE = true;
  static constexpr int VEC = vec_elems<T>();
  // Each thread's ordinary stores to the chunk buffers, before the barrier, for the tensor cores.
  __device__ static void published() { wg::fence_proxy(); }
  float d[16];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 16; ++i) d[i] = 0.f;
  }
  // As [BK / VEC][BM][VEC], Bs [BK / VEC][BN][VEC] (Stage::put_core): K-step s starts 2 piece
  // columns (16 of K) further on; warpgroup g's B rows 32 g rows further on.
  __device__ void issue(const T* As, const T* Bs) {
    const int g = threadIdx.x >> 7;
    wg::fence_operands(d);
    wg::fence();
#pragma unroll
    for (int s = 0; s < BK / 16; ++s)
      wg::mma_m64n32k16<T>(d, wg::desc(As + 2 * s * BM * VEC, BM * 16, 128),
                           wg::desc(Bs + 2 * s * BN * VEC + 32 * g * VEC, BN * 16, 128));
    wg::commit();
  }
  __device__ void wait() {
    wg::wait_all();
    wg::fence_operands(d);
  }
  // d[4j + v] is S[16 w + lane / 4 + 8 (v / 2)][8 j + 2 (lane % 4) + v % 2] of the warpgroup's
  // 64 x 32 (w: warp in the warpgroup).
  __device__ void store(float* S) {
    const int t = threadIdx.x & 127, lane = t & 31;
    const int r = 16 * (t >> 5) + (lane >> 2), c = 32 * (threadIdx.x >> 7) + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      S[r * LDS + c + 8 * j] = d[4 * j];
      S[r * LDS + c + 8 * j + 1] = d[4 * j + 1];
      S[(r + 8) * LDS + c + 8 * j] = d[4 * j + 2];
      S[(r + 8) * LDS + c + 8 * j + 1] = d[4 * j + 3];
    }
  }
};

template <typename T> struct ScoreOf<T, true> {
  static_assert(sizeof(T) == 2 && BM == 64 && BN == 64 && THREADS == 256, "two warpgroups, m64n32 each");
  using type = ScoreWG<T>;
};
#endif

// S[BM][LDS] = A[a0:a0+BM] @ B[b0:b0+BN]^T over all of D (A: [MA, D], B: [MB, D] row-major).
// As: [2][BM][LDK], Bs: [2][BN][LDK], two buffers per operand: while the tensor cores work on
// chunk k in one, chunk k + 1 is on its way from global memory in registers, then goes to the
// other. One barrier per chunk. Ends with a barrier: S is complete and As/Bs are free.
// Bcopy (optional, pitch ldc) also receives every B chunk, i.e. B[b0:b0+BN, :D] from its column
// 0 on, so that a backward whose D fits in one slab reads these rows once; its columns past the
// last chunk are left as they were.
// WG: the score tile on wgmma (ScoreWG; 16-bit inputs, launched only where wgmma_available()
// says the GPU runs sm_90a code), its chunk buffers in the core-matrix layout.
template <typename T, bool WG = false>
__device__ void score_tile(float* S, T* As, T* Bs, const T* A, int64_t a0, int64_t MA, const T* Bm,
                           int64_t b0, int64_t MB, int64_t D, T* Bcopy = nullptr, int ldc = 0) {
#ifndef FASTCL_WGMMA
  if constexpr (WG) {
    __trap();  // code built for a GPU without wgmma: the launcher never picks this
    return;
  }
#endif
  using Acc = typename ScoreOf<T, WG>::type;
  const bool vec = vec_ok(A, D) && vec_ok(Bm, D);
  Acc acc;
  acc.zero();
  Stage<T, BM, BK, Acc::CORE> sa;
  Stage<T, BN, BK, Acc::CORE> sb;
  auto put = [&](int buf, int64_t k) {  // chunk k, from the registers to buffer buf
    if constexpr (Acc::CORE) {
      sa.put_core(As + buf * BM * LDK);
      sb.put_core(Bs + buf * BN * LDK);
    } else {
      sa.put(As + buf * BM * LDK, LDK);
      sb.put(Bs + buf * BN * LDK, LDK);
    }
    if (Bcopy) sb.put(Bcopy + k * BK, ldc);
    Acc::published();
  };
  sa.fetch(A, a0, MA, 0, D, vec);
  sb.fetch(Bm, b0, MB, 0, D, vec);
  put(0, 0);
  __syncthreads();
  const int64_t nk = (D + BK - 1) / BK;
  for (int64_t k = 0; k < nk; ++k) {
    // Buffer k & 1 holds chunk k. The other one was last read by chunk k - 1's MMAs, which every
    // thread waited for before the barrier that ended it: free to refill.
    const int cur = (int)(k & 1);
    const bool more = k + 1 < nk;
    if (more) {
      sa.fetch(A, a0, MA, (k + 1) * BK, D, vec);
      sb.fetch(Bm, b0, MB, (k + 1) * BK, D, vec);
    }
    acc.issue(As + cur * BM * LDK, Bs + cur * BN * LDK);
    if (more) put(cur ^ 1, k + 1);
    acc.wait();
    __syncthreads();
  }
  acc.store(S);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Slab: a BM x BD fp32 gradient accumulator, acc += G[BM][BN] @ Bslab[BN][BD], kept in
// registers across all column tiles; stored once per slab. BD (a multiple of 32) is the D-slab:
// when D <= BD the scores are computed once per tile for the whole gradient.
constexpr int ldv(int bd) { return bd + 8; }  // pitch of the B slab in shared memory
// ---------------------------------------------------------------------------------------------
template <typename T, int BD> struct Slab {  // 16-bit: warp w owns rows 16*(w%4).., columns BD/2*(w/4)..
  static constexpr int LDV = ldv(BD);
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[BD / 32];
  __device__ void zero() {
#pragma unroll
    for (int j = 0; j < BD / 32; ++j) nvcuda::wmma::fill_fragment(c[j], 0.f);
  }
  // Gs: [BM][LDG], Vs: [BN][LDV]
  __device__ void step(const T* Gs, const T* Vs) {
    using namespace nvcuda;
    const int w = threadIdx.x >> 5, r0 = (w & 3) * 16, c0 = (w >> 2) * (BD / 2);
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, Gs + r0 * LDG + kk, LDG);
#pragma unroll
      for (int j = 0; j < BD / 32; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, Vs + kk * LDV + c0 + 16 * j, LDV);
        wmma::mma_sync(c[j], a, b, c[j]);
      }
    }
  }
  // out[a0 + r, d0 + c] = acc[r, c] * inv_amp for rows < MA, columns < D; stage: this warp's
  // 16 x 16 fp32 scratch (the fragments' element layout is opaque).
  __device__ void store(T* out, int64_t a0, int64_t MA, int64_t d0, int64_t D, float inv_amp,
                        float* stage) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = (w & 3) * 16,
              c0 = (w >> 2) * (BD / 2);
#pragma unroll
    for (int j = 0; j < BD / 32; ++j) {
      nvcuda::wmma::store_matrix_sync(stage, c[j], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t gr = a0 + r0 + e / 16, gc = d0 + c0 + 16 * j + e % 16;
        if (gr < MA && gc < D) out[gr * D + gc] = from_f<T>(stage[e] * inv_amp);
      }
      __syncwarp();
    }
  }
};

template <int BD> struct Slab<float, BD> {  // thread t owns rows 4*(t/16)+i, columns (t%16)+16*j
  static constexpr int LDV = ldv(BD);
  float c[4][BD / 16];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < BD / 16; ++j) c[i][j] = 0.f;
  }
  __device__ void step(const float* Gs, const float* Vs) {
    const int r0 = (threadIdx.x >> 4) * 4, c0 = threadIdx.x & 15;
#pragma unroll 2
    for (int k = 0; k < BN; ++k) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Gs[(r0 + i) * LDG + k];
#pragma unroll
      for (int j = 0; j < BD / 16; ++j) {
        const float b = Vs[k * LDV + c0 + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) c[i][j] = fmaf(a[i], b, c[i][j]);
      }
    }
  }
  __device__ void store(float* out, int64_t a0, int64_t MA, int64_t d0, int64_t D, float inv_amp,
                        float*) {
    const int r0 = (threadIdx.x >> 4) * 4, c0 = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < BD / 16; ++j) {
        const int64_t gr = a0 + r0 + i, gc = d0 + c0 + 16 * j;
        if (gr < MA && gc < D) out[gr * D + gc] = c[i][j] * inv_amp;
      }
  }
};

}  // namespace fastcl
