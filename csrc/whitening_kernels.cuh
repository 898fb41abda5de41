// Group whitening's coupled Newton-Schulz iteration, one block per group (g <= 128):
//   Y0 = S / c, Z0 = I, c = ||S||_F;  T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z;  W = Z / sqrt(c).
// Y, Z and T stay in shared memory for all iterations: one launch instead of 3 * iters batched
// matmuls. fp32 FMAs throughout, as the Triton kernel's "ieee" dots (kernels/whitening.py).
// Included by whitening.cu (nvcc) and by csrc/emulate/ (the CPU emulation used in tests).
#pragma once

#include <cmath>
#include <cstddef>

#include "tile.cuh"

namespace fastcl {

constexpr int NS_MAX_G = 128;
constexpr int NS_PER_THREAD = NS_MAX_G * NS_MAX_G / THREADS;  // outputs per thread, at most

__global__ void __launch_bounds__(THREADS)
newton_schulz_kernel(const float* __restrict__ S, float* __restrict__ W, int g, int iters) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* Y = reinterpret_cast<float*>(smem);
  float* Z = Y + g * g;
  float* T = Z + g * g;
  float* red = T + g * g;  // THREADS / 32 block-reduction slots
  const int gg = g * g;
  const float* s = S + (size_t)blockIdx.x * gg;

  float ss = 0.f;  // ||S||_F: eigenvalues of S / c lie in (0, 1], where the iteration converges
  for (int e = threadIdx.x; e < gg; e += THREADS) ss += s[e] * s[e];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float c = 0.f;
  for (int w = 0; w < THREADS / 32; ++w) c += red[w];
  c = sqrtf(c);
  for (int e = threadIdx.x; e < gg; e += THREADS) {
    Y[e] = s[e] / c;
    Z[e] = (e / g == e % g) ? 1.f : 0.f;
  }
  __syncthreads();

  for (int it = 0; it < iters; ++it) {
    for (int e = threadIdx.x; e < gg; e += THREADS) {  // T = 1.5 I - 0.5 Z Y
      const int i = e / g, j = e % g;
      float acc = 0.f;
      for (int k = 0; k < g; ++k) acc = fmaf(Z[i * g + k], Y[k * g + j], acc);
      T[e] = (i == j ? 1.5f : 0.f) - 0.5f * acc;
    }
    __syncthreads();
    float ny[NS_PER_THREAD], nz[NS_PER_THREAD];  // Y T and T Z, held until every read is done
#pragma unroll
    for (int r = 0; r < NS_PER_THREAD; ++r) {
      const int e = threadIdx.x + r * THREADS;
      if (e < gg) {
        const int i = e / g, j = e % g;
        float ay = 0.f, az = 0.f;
        for (int k = 0; k < g; ++k) {
          ay = fmaf(Y[i * g + k], T[k * g + j], ay);
          az = fmaf(T[i * g + k], Z[k * g + j], az);
        }
        ny[r] = ay;
        nz[r] = az;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < NS_PER_THREAD; ++r) {
      const int e = threadIdx.x + r * THREADS;
      if (e < gg) {
        Y[e] = ny[r];
        Z[e] = nz[r];
      }
    }
    __syncthreads();
  }
  const float inv_sqrt_c = 1.f / sqrtf(c);
  for (int e = threadIdx.x; e < gg; e += THREADS) W[(size_t)blockIdx.x * gg + e] = Z[e] * inv_sqrt_c;
}

inline size_t newton_schulz_smem(int g) { return (3 * (size_t)g * g + THREADS / 32) * sizeof(float); }

}  // namespace fastcl
