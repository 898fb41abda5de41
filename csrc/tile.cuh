// Tile math shared by the fused InfoNCE kernels (forward and both backward launches).
//
// One block = 256 threads (8 warps) works on a BM x BN tile of S = s * A @ B^T.
// 16-bit inputs go through the tensor cores (WMMA 16x16x16, fp32 accumulators); fp32 inputs
// use plain fp32 FMAs, so that fp32 results are as precise as torch's default (non-TF32)
// matmul, the code fastcl replaces.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

// Rows [r0, r0 + R) x columns [c0, c0 + C) of a row-major [rows, cols] matrix into shared
// memory with pitch ld, zero-filled outside the matrix.
template <typename T, int R, int C>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t r0, int64_t rows,
                                          int64_t c0, int64_t cols) {
  for (int e = threadIdx.x; e < R * C; e += THREADS) {
    const int r = e / C, c = e % C;
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[r * ld + c] = (gr < rows && gc < cols) ? src[gr * cols + gc] : from_f<T>(0.f);
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
// Ends with a barrier: S is complete and As/Bs are free.
template <typename T>
__device__ void score_tile(float* S, T* As, T* Bs, const T* A, int64_t a0, int64_t MA, const T* Bm,
                           int64_t b0, int64_t MB, int64_t D) {
  Score<T> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    load_tile<T, BM, BK>(As, LDK, A, a0, MA, k0, D);
    load_tile<T, BN, BK>(Bs, LDK, Bm, b0, MB, k0, D);
    __syncthreads();
    acc.step(As, Bs);
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
