// Tile math shared by the fused InfoNCE kernels (forward and both backward launches).
//
// One block = 256 threads (8 warps) works on a BM x BN tile of S = s * A @ B^T.
// 16-bit inputs go through the tensor cores (WMMA 16x16x16, fp32 accumulators); fp32 inputs
// use plain fp32 FMAs, so that fp32 results are as precise as torch's default (non-TF32)
// matmul, the code fastcl replaces.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>  // make_uint4 (nvcc includes it anyway; the CPU emulation does not)
#include <vector_types.h>
#ifndef FASTCL_EMULATE  // csrc/emulate/cuda_emu.h provides nvcuda::wmma on the CPU
#include <mma.h>
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
// Finite stand-in for -inf in masked lanes: keeps (x - max) free of inf - inf = NaN.
constexpr float NEG = -1.0e30f;

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
// loads are in flight meanwhile. Thread t holds pieces t, t + THREADS, ... (consecutive threads,
// consecutive pieces of a row: coalesced). dst + r * ld must stay 16-byte aligned (ld * sizeof(T)
// a multiple of 16).
template <typename T, int R, int C> struct Stage {
  static constexpr int VEC = vec_elems<T>(), PR = C / VEC, PER = R * PR / THREADS;
  static_assert(C % VEC == 0 && (R * PR) % THREADS == 0, "whole pieces, evenly over the threads");
  uint4 v[PER];
  __device__ __forceinline__ void fetch(const T* src, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                        bool vec) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int g = threadIdx.x + p * THREADS, r = g / PR, c = (g % PR) * VEC;
      v[p] = fetch_piece(src, r0 + r, rows, c0 + c, cols, vec);
    }
  }
  __device__ __forceinline__ void put(T* dst, int ld) const {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int g = threadIdx.x + p * THREADS, r = g / PR, c = (g % PR) * VEC;
      st16(dst + r * ld + c, v[p]);
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
template <typename T> struct Score {  // 16-bit: warp w owns rows 16*(w%4).., columns 32*(w/4)..
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];
  __device__ void zero() {
    nvcuda::wmma::fill_fragment(c[0], 0.f);
    nvcuda::wmma::fill_fragment(c[1], 0.f);
  }
  // As: [BM][LDK], Bs: [BN][LDK] (the B rows; read as B^T in column-major order)
  __device__ void step(const T* As, const T* Bs) {
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
  float c[4][4];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = 0.f;
  }
  __device__ void step(const float* As, const float* Bs) {
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

// S[BM][LDS] = A[a0:a0+BM] @ B[b0:b0+BN]^T over all of D (A: [MA, D], B: [MB, D] row-major).
// As: [2][BM][LDK], Bs: [2][BN][LDK], two buffers per operand: while the tensor cores work on
// chunk k in one, chunk k + 1 is on its way from global memory in registers, then goes to the
// other. One barrier per chunk. Ends with a barrier: S is complete and As/Bs are free.
// Bcopy (optional, pitch ldc) also receives every B chunk, i.e. B[b0:b0+BN, :D] from its column
// 0 on, so that a backward whose D fits in one slab reads these rows once; its columns past the
// last chunk are left as they were.
template <typename T>
__device__ void score_tile(float* S, T* As, T* Bs, const T* A, int64_t a0, int64_t MA, const T* Bm,
                           int64_t b0, int64_t MB, int64_t D, T* Bcopy = nullptr, int ldc = 0) {
  const bool vec = vec_ok(A, D) && vec_ok(Bm, D);
  Score<T> acc;
  acc.zero();
  Stage<T, BM, BK> sa;
  Stage<T, BN, BK> sb;
  sa.fetch(A, a0, MA, 0, D, vec);
  sb.fetch(Bm, b0, MB, 0, D, vec);
  sa.put(As, LDK);
  sb.put(Bs, LDK);
  if (Bcopy) sb.put(Bcopy, ldc);
  __syncthreads();
  const int64_t nk = (D + BK - 1) / BK;
  for (int64_t k = 0; k < nk; ++k) {
    // Buffer k & 1 holds chunk k. The other one was last read in step k - 1, which every
    // thread finished before the barrier that ended it: free to refill.
    const int cur = (int)(k & 1);
    const bool more = k + 1 < nk;
    if (more) {
      sa.fetch(A, a0, MA, (k + 1) * BK, D, vec);
      sb.fetch(Bm, b0, MB, (k + 1) * BK, D, vec);
    }
    acc.step(As + cur * BM * LDK, Bs + cur * BN * LDK);
    if (more) {
      sa.put(As + (cur ^ 1) * BM * LDK, LDK);
      sb.put(Bs + (cur ^ 1) * BN * LDK, LDK);
      if (Bcopy) sb.put(Bcopy + (k + 1) * BK, ldc);
    }
    __syncthreads();
  }
  acc.store(S);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Slab: a BM x BD fp32 gradient accumulator, acc += G[BM][BN] @ Bslab[BN][BD], kept in
// registers across all column tiles; stored once per slab. BD (a multiple of 32) is the D-slab:
// when D <= BD the scores are computed once per tile for the whole gradient.
template <int BD> constexpr int ldv() { return BD + 8; }  // pitch of the B slab in shared memory
// ---------------------------------------------------------------------------------------------
template <typename T, int BD> struct Slab {  // 16-bit: warp w owns rows 16*(w%4).., columns BD/2*(w/4)..
  static constexpr int LDV = ldv<BD>();
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
  static constexpr int LDV = ldv<BD>();
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
