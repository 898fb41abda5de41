// The fused InfoNCE kernels: included by info_nce.cu (nvcc) and, for tests on machines
// without a GPU, by csrc/emulate/ (the same source run by a CPU emulation of CUDA).
//
// Same contract and statistics as the Triton kernels (kernels/info_nce.py), so the two are
// interchangeable behind fastcl's one dispatch point. For S = s * U @ V^T, never stored:
//   forward : per row i of S  max, log2-sum-exp2 (log2 units), positive logit, #positives;
//             per column j (symmetric) partial (max, sum) per block, merged on the host side.
//   backward: G_ij = gr_i (P_ij - [j pos of i]) + gc_j (Q_ij - [i == j]); with label smoothing
//             eps the targets are (1 - eps) [..] + eps / N (pos_w, uni_w);
//             dU = s G V, dV = s G^T U (one kernel, launched over row blocks and over column
//             blocks), d s = sum_ij G_ij <u_i, v_j> centred on the positive.
// Offsets are 64-bit: no 2^31-element limit here.
#pragma once

#include <cstddef>
#include <type_traits>

#include "tile.cuh"

namespace fastcl {

enum Flags : int {
  HAS_COL = 1,     // symmetric: column statistics / column term
  HAS_LABELS = 2,  // positives from labels (else the diagonal)
  EXCL_DIAG = 4,   // S_ii leaves the row's log-sum-exp
  EXCL_POS = 8,    // the positive leaves the row's log-sum-exp (DCL)
  MULTI_POS = 16,  // positives = other columns of the same class (SupCon)
  TRANSPOSED = 32  // backward launch over the columns of S (dV)
};

__device__ __forceinline__ float quad_max(float x) {  // over the 4 lanes that share a row
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A quad's 4 x 16 logits (log2 units) of one row or one column of a tile, with their keep mask:
// the largest kept one, and the sum of exp2(z - ref) over the kept ones.
__device__ __forceinline__ float quad_kept_max(const float (&z)[16], const bool (&keep)[16]) {
  float mx = NEG;
#pragma unroll
  for (int c = 0; c < 16; ++c)
    if (keep[c]) mx = fmaxf(mx, z[c]);
  return quad_max(mx);
}
__device__ __forceinline__ float quad_kept_sum_exp2(const float (&z)[16], const bool (&keep)[16], float ref) {
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < 16; ++c) sum += keep[c] ? exp2f(z[c] - ref) : 0.f;
  return quad_sum(sum);
}

// ---------------------------------------------------------------------------------------------
// Forward. Persistent blocks over row blocks; block p merges its column statistics into row p
// of the [P, N] partial buffers (only it writes there: no atomics, memory linear in N).
// ---------------------------------------------------------------------------------------------
// WG: the score tile on wgmma (tile.cuh), for 16-bit inputs on GPUs running sm_90a code.
template <typename T, bool WG = false>
__global__ void __launch_bounds__(THREADS)
lse_fwd_kernel(const T* __restrict__ U, const T* __restrict__ V, const float* __restrict__ scale,
               const int64_t* __restrict__ labels, const int64_t* __restrict__ row_cls,
               const int64_t* __restrict__ col_cls, float* __restrict__ row_stats,
               float* __restrict__ col_m, float* __restrict__ col_l, int64_t B, int64_t N, int64_t D,
               int flags) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + 2 * BM * LDK;  // two chunk buffers per operand (score_tile)
  float* S = reinterpret_cast<float*>(Bs + 2 * BN * LDK);
  int64_t* ccls_s = reinterpret_cast<int64_t*>(S + BM * LDS);

  const bool has_col = flags & HAS_COL, multi = flags & MULTI_POS;
  const bool excl_diag = flags & EXCL_DIAG, excl_pos = flags & EXCL_POS;
  const float s2 = scale[0] * LOG2E;  // log2 domain: exp2 is the native instruction
  const int r = threadIdx.x >> 2, q = threadIdx.x & 3;  // row (column) r, quarter q of the tile

  for (int64_t rb = blockIdx.x; rb * BM < B; rb += gridDim.x) {
    const int64_t row = rb * BM + r;
    const bool rvalid = row < B;
    const int64_t y = rvalid ? ((flags & HAS_LABELS) ? labels[row] : row) : -1;
    const int64_t rcls = (multi && rvalid) ? row_cls[row] : -1;
    float m = NEG, l = 0.f, pos = 0.f, cnt = 0.f;  // m, l replicated over the row's 4 lanes

    for (int64_t cb = 0; cb * BN < N; ++cb) {
      const int64_t c0 = cb * BN;
      if (multi && threadIdx.x < BN) ccls_s[threadIdx.x] = c0 + threadIdx.x < N ? col_cls[c0 + threadIdx.x] : -2;
      score_tile<T, WG>(S, As, Bs, U, rb * BM, B, V, c0, N, D);

      // Row statistics: lane q covers columns 16q .. 16q+15 of row r.
      float z[16];
      bool keep[16];
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        const int cc = q * 16 + c;
        const int64_t col = c0 + cc;
        const bool valid = rvalid && col < N;
        z[c] = S[r * LDS + cc] * s2;
        const bool is_pos = col == y;
        // The positive logit from this very tile, so that (max - pos) is exact when the
        // positive is the row maximum, as in a naive log-softmax.
        if (multi) {
          const bool pm = valid && ccls_s[cc] == rcls && col != row;
          pos += pm ? z[c] : 0.f;
          cnt += pm ? 1.f : 0.f;
        } else if (is_pos && valid) {
          pos += z[c];
        }
        keep[c] = valid && !(excl_diag && col == row) && !(excl_pos && is_pos);
      }
      const float m_new = fmaxf(m, quad_kept_max(z, keep));
      l = l * exp2f(m - m_new) + quad_kept_sum_exp2(z, keep, m_new);
      m = m_new;

      if (has_col) {  // column statistics: lane q covers rows 16q .. 16q+15 of column r
        const int64_t col = c0 + r;
        float cz[16];
        bool ck[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int rr = q * 16 + i;
          const int64_t row_i = rb * BM + rr;
          ck[i] = row_i < B && col < N && !(excl_diag && row_i == col);
          cz[i] = S[rr * LDS + r] * s2;
        }
        const float cmax = quad_kept_max(cz, ck);
        const float csum = quad_kept_sum_exp2(cz, ck, cmax);
        if (q == 0 && col < N && csum > 0.f) {
          const int64_t p = (int64_t)blockIdx.x * N + col;
          const float m_old = col_m[p], m2 = fmaxf(m_old, cmax);
          col_l[p] = col_l[p] * exp2f(m_old - m2) + csum * exp2f(cmax - m2);
          col_m[p] = m2;
        }
      }
      __syncthreads();  // S and ccls_s are overwritten by the next tile
    }
    pos = quad_sum(pos);
    cnt = quad_sum(cnt);
    if (multi) {  // mean positive logit; rows without positives get 0 (and count 0)
      pos = cnt > 0.f ? pos / cnt : 0.f;
    } else {
      cnt = 1.f;
    }
    if (q == 0 && rvalid) {  // rows: max, log2(sum), positive logit (log2 units), #positives
      row_stats[row] = m;
      row_stats[B + row] = log2f(l);
      row_stats[2 * B + row] = pos;
      row_stats[3 * B + row] = cnt;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------
struct Side {  // what G needs about one row of S (r*) or one column of S (c*)
  float rm, rl, gr, posr, icnt;
  float cm, cl, gc, posc;
  float ctr;  // d scale's centre of this row (column): its positive, or smoothing's target mean
  int64_t y, rcls, ccls;
};
static_assert(sizeof(Side) == 64, "Side's 10 floats fill the 8-byte slot the 9 left padded");

// ctr: [B + N] centres (fastcl.chunked.smoothing_centres, log2 units) with label smoothing,
// else nullptr: each row (column) is centred on its positive.
__device__ __forceinline__ void load_row_side(Side& s, const float* row_stats, const float* g_row,
                                              const int64_t* labels, const int64_t* row_cls,
                                              const float* ctr, int64_t i, int64_t B, int flags) {
  const bool ok = i < B;
  s.rm = ok ? row_stats[i] : 0.f;
  s.rl = ok ? row_stats[B + i] : 0.f;
  s.posr = ok ? row_stats[2 * B + i] : 0.f;
  s.icnt = 1.f / fmaxf(ok ? row_stats[3 * B + i] : 1.f, 1.f);
  s.gr = ok ? g_row[i] : 0.f;
  s.y = ok ? ((flags & HAS_LABELS) ? labels[i] : i) : -1;
  s.rcls = (ok && (flags & MULTI_POS)) ? row_cls[i] : -1;
  s.ctr = ctr ? (ok ? ctr[i] : 0.f) : s.posr;
}

__device__ __forceinline__ void load_col_side(Side& s, const float* row_stats,
                                              const float* col_stats, const float* g_col,
                                              const int64_t* col_cls, const float* ctr, int64_t j,
                                              int64_t B, int64_t N, int flags) {
  const bool ok = j < N;
  const bool has_col = (flags & HAS_COL) && ok;
  s.cm = has_col ? col_stats[j] : 0.f;
  s.cl = has_col ? col_stats[N + j] : 0.f;
  s.gc = has_col ? g_col[j] : 0.f;
  s.posc = has_col ? row_stats[2 * B + j] : 0.f;  // column j's positive is S_jj (N == B)
  s.ccls = (ok && (flags & MULTI_POS)) ? col_cls[j] : -2;
  s.ctr = (ctr && has_col) ? ctr[B + j] : s.posc;
}

// dA[a] = s * sum_b G[a, b] * Bm[b] for a block of BM rows of A:
//   A = U, Bm = V, G[a, b] = G_ab (dU, and d scale partials), or, TRANSPOSED,
//   A = V, Bm = U, G[a, b] = G_ba (dV).
// The positive (and the diagonal) use the forward's stored logit rather than the recomputed
// one, so that P - 1 keeps its digits however this tile's dot rounds.
// Two blocks per SM where shared memory allows it (16-bit, D <= 128: 79 KB each); the register
// cap this sets (128) costs 12 bytes of spills there (scripts/kernel_resources.sh).
template <typename T, int BD, bool WG = false>
__global__ void __launch_bounds__(THREADS, (sizeof(T) == 2 && BD <= 128) ? 2 : 1)
grad_kernel(const T* __restrict__ A, const T* __restrict__ Bm, const float* __restrict__ scale,
            const float* __restrict__ amp_p, const float* __restrict__ row_stats,
            const float* __restrict__ col_stats, const float* __restrict__ g_row,
            const float* __restrict__ g_col, const int64_t* __restrict__ labels,
            const int64_t* __restrict__ row_cls, const int64_t* __restrict__ col_cls,
            T* __restrict__ dA, float* __restrict__ dscale, int64_t MA, int64_t MB, int64_t D,
            int64_t B, int64_t N, int flags, float pos_w, float uni_w, const float* __restrict__ ctr) {
  extern __shared__ __align__(128) unsigned char smem[];
  Side* side_a = reinterpret_cast<Side*>(smem);
  Side* side_b = side_a + BM;
  float* S = reinterpret_cast<float*>(side_b + BN);
  float* stage = S + BM * LDS;  // 8 warps x 16 x 16
  T* As = reinterpret_cast<T*>(stage + 8 * 256);
  T* Bs = As + 2 * BM * LDK;  // two chunk buffers per operand (score_tile)
  T* Gs = Bs + 2 * BN * LDK;
  T* Vs = Gs + BM * LDG;
  constexpr int LDV = ldv(BD);
  float* red = reinterpret_cast<float*>(Vs + BN * LDV);  // THREADS / 32 block-reduction slots

  const bool trans = flags & TRANSPOSED, has_col = flags & HAS_COL, multi = flags & MULTI_POS;
  const bool excl_diag = flags & EXCL_DIAG, excl_pos = flags & EXCL_POS;
  const float s = scale[0], s2 = s * LOG2E, amp = amp_p[0];
  const int64_t a0 = (int64_t)blockIdx.x * BM;
  const bool one_slab = D <= BD, vec_b = vec_ok(Bm, D);  // vec_b: 16-byte slab loads

  if (threadIdx.x < BM) {
    const int64_t a = a0 + threadIdx.x;
    Side sd;
    if (trans) load_col_side(sd, row_stats, col_stats, g_col, col_cls, ctr, a, B, N, flags);
    else load_row_side(sd, row_stats, g_row, labels, row_cls, ctr, a, B, flags);
    side_a[threadIdx.x] = sd;
  }
  float dsc = 0.f;

  for (int64_t d0 = 0; d0 < D; d0 += BD) {  // one slab when D <= BD; else S per slab
    Slab<T, BD> acc;
    acc.zero();
    for (int64_t b0 = 0; b0 < MB; b0 += BN) {
      if (threadIdx.x < BN) {
        const int64_t b = b0 + threadIdx.x;
        Side sd;
        if (trans) load_row_side(sd, row_stats, g_row, labels, row_cls, ctr, b, B, flags);
        else load_col_side(sd, row_stats, col_stats, g_col, col_cls, ctr, b, B, N, flags);
        side_b[threadIdx.x] = sd;
      }
      // Its barriers publish side_b too. With one slab, the chunks it loads are the slab: Vs
      // (free since the barrier that ended the last tile) is filled on the way.
      score_tile<T, WG>(S, As, Bs, A, a0, MA, Bm, b0, MB, D, one_slab ? Vs : nullptr, LDV);

      for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
        const int ta = e / BN, tb = e % BN;
        const int64_t ia = a0 + ta, ib = b0 + tb;
        float g = 0.f;
        if (ia < MA && ib < MB) {
          const Side& R = trans ? side_b[tb] : side_a[ta];
          const Side& C = trans ? side_a[ta] : side_b[tb];
          const int64_t i = trans ? ib : ia, j = trans ? ia : ib;
          const float acc_ij = S[ta * LDS + tb], z = acc_ij * s2;
          const bool is_pos = j == R.y;
          const bool keep = !(excl_diag && i == j) && !(excl_pos && is_pos);
          float p, ind;
          if (multi) {
            ind = (C.ccls == R.rcls && i != j) ? R.icnt : 0.f;
            // No single stored positive to reuse. fp32 recomputes S with the forward's own FMA
            // sequence: nothing to mend. 16-bit snaps a logit within rounding (2^-20 relative)
            // of the forward's row max back onto it, in case the forward's tensor-core path
            // (wgmma on Hopper) rounds differently. The snap also erases real gaps that small
            // (near-duplicate positives: 20x naive fp32's gradient error in emulation), which
            // 16-bit inputs' budget absorbs and fp32's does not.
            float dz = z - R.rm;
            if (sizeof(T) == 2 && dz > -9.5367431640625e-07f * fmaxf(fabsf(R.rm), 1.f)) dz = 0.f;
            p = keep ? exp2f(dz - R.rl) : 0.f;
          } else {
            ind = is_pos ? pos_w : 0.f;  // 1 - eps on the positive (1 without smoothing)
            p = keep ? exp2f(((is_pos ? R.posr : z) - R.rm) - R.rl) : 0.f;
          }
          g = R.gr * ((p - ind) - uni_w);  // uni_w = eps / N: exact 0 without smoothing
          // Rows (columns) of each term sum to 0 exactly: centring <u_i, v_j> on the positive
          // (with smoothing, the target's mean) keeps their rounding out of d scale.
          float ds = g * (acc_ij - R.ctr / s2);
          if (has_col) {
            const bool diag = i == j;
            const float qv = exp2f(((diag ? C.posc : z) - C.cm) - C.cl);
            const float gq = C.gc * ((diag ? qv - pos_w : qv) - uni_w);
            g += gq;
            ds += gq * (acc_ij - C.ctr / s2);
          }
          if (!trans && d0 == 0) dsc += ds;
          // G goes through the tensor cores in the input dtype; amp (a power of two, exact)
          // lifts it out of fp16's subnormal range.
          g *= s * amp;
        }
        Gs[ta * LDG + tb] = from_f<T>(g);
      }
      if (!one_slab) copy_tile<T, BN, BD>(Vs, LDV, Bm, b0, MB, d0, D, vec_b);
      __syncthreads();
      acc.step(Gs, Vs);
      __syncthreads();  // Gs, Vs and side_b are overwritten by the next tile
    }
    acc.store(dA, a0, MA, d0, D, 1.f / amp, stage + (threadIdx.x >> 5) * 256);
  }

  if (!trans) {  // one d scale partial per block, summed on the host side
    for (int o = 16; o > 0; o >>= 1) dsc += __shfl_xor_sync(0xffffffffu, dsc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = dsc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f;
      for (int w = 0; w < THREADS / 32; ++w) t += red[w];
      dscale[blockIdx.x] = t;
    }
  }
}

// Dynamic shared memory of each kernel, carved up in the kernels above.
template <typename T> inline size_t fwd_smem() {
  return 2 * (BM + BN) * LDK * sizeof(T) + BM * LDS * sizeof(float) + BN * sizeof(int64_t);
}
template <typename T> constexpr size_t bwd_smem(int bd) {
  return (BM + BN) * sizeof(Side) + (BM * LDS + 8 * 256) * sizeof(float) +
         (2 * (BM + BN) * LDK + BM * LDG + BN * ldv(bd)) * sizeof(T) + (THREADS / 32) * sizeof(float);
}

// The backward's D-slab: the whole of D in one slab up to 512 (256 for fp32, whose slab takes
// twice the shared memory), so that S is recomputed once per tile, as in the Triton backward
// (benchmarks/RESULTS.md: two slabs cost 1.6x there). Where that slab's shared memory is over the
// GPU's per-block limit (smem_limit), a thinner one that fits: 16-bit D > 256 on sm_86/89 (99 KB)
// then takes 256-wide slabs (95 KB) instead of failing. The fp32 backward needs 125 KB even at
// 128 wide; the launcher's check says so. f(std::integral_constant<int, BD>{}).
template <typename T, typename F> inline void with_slab(int64_t D, size_t smem_limit, F&& f) {
  int bd = D <= 128 ? 128 : (sizeof(T) == 4 || D <= 256) ? 256 : 512;
  while (bd > 128 && bwd_smem<T>(bd) > smem_limit) bd /= 2;
  if (bd == 128) return f(std::integral_constant<int, 128>{});
  if constexpr (sizeof(T) == 4) {
    return f(std::integral_constant<int, 256>{});
  } else {
    if (bd == 256) return f(std::integral_constant<int, 256>{});
    return f(std::integral_constant<int, 512>{});
  }
}
}  // namespace fastcl
