// Runs the CUDA kernels (csrc/info_nce_kernels.cuh, csrc/whitening_kernels.cuh) under the CPU
// emulation of CUDA (cuda_emu.h), for tests on machines without a GPU
// (tests/test_cuda_emulated.py).
//
//   run_kernels fwd|bwd f32|f16|bf16 B N D flags grid DIR [wg]
//   run_kernels ns G g iters DIR      (Newton-Schulz: S.f32 [G,g,g] -> W.out)
//
// Reads raw little-endian arrays from DIR: u.f32 [B,D] and v.f32 [N,D] (rounded to the dtype
// here), scale.f32 [1], and, when present, labels.i64, row_cls.i64, col_cls.i64; bwd also
// row_stats.f32 [4,B], col_stats.f32 [2,N], g_row.f32, g_col.f32, amp.f32 [1], and, when
// present, smooth.f32 [2]: label smoothing's (pos_w, uni_w) (default 1, 0: none) and ctr.f32
// [B + N (symmetric) or B]: its d scale centres.
// wg: the kernels' wgmma variant (the Hopper score tile; 16-bit dtypes only).
// FASTCL_EMU_SMEM (env, bytes): the emulated GPU's shared memory per block (default: all of
// `smem`, as much as any GPU has); bwd exits with 4 where the launcher's check would raise.
// Writes the kernels' raw outputs to DIR, poisoned first as the host launchers do:
//   fwd: row_stats.out [4,B], col_m.out [grid,N], col_l.out [grid,N]
//   bwd: du.out [B,D], dv.out [N,D], dscale.out [ceil(B/BM)] (float32), slab.out [1]: the
//        D-slab width the launcher chose
#include "cuda_emu.h"
#include "../info_nce_kernels.cuh"
#include "../whitening_kernels.cuh"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>

namespace fastcl {
alignas(128) unsigned char smem[1 << 18];  // the kernels' `extern __shared__` block
}

namespace {

std::string g_dir;

template <typename X> std::vector<X> read(const std::string& name, size_t n, bool optional = false) {
  std::ifstream f(g_dir + "/" + name, std::ios::binary);
  if (!f) {
    if (optional) return {};
    std::fprintf(stderr, "missing %s\n", name.c_str());
    std::exit(2);
  }
  std::vector<X> out(n);
  f.read(reinterpret_cast<char*>(out.data()), n * sizeof(X));
  if ((size_t)f.gcount() != n * sizeof(X)) {
    std::fprintf(stderr, "%s: expected %zu bytes\n", name.c_str(), n * sizeof(X));
    std::exit(2);
  }
  return out;
}

void write(const std::string& name, const std::vector<float>& x) {
  std::ofstream f(g_dir + "/" + name, std::ios::binary);
  f.write(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
}

template <typename T> std::vector<T> to_dtype(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = fastcl::from_f<T>(x[i]);
  return out;
}

const int64_t* ptr_or_null(const std::vector<int64_t>& x) { return x.empty() ? nullptr : x.data(); }

template <typename T, bool WG> int run(bool fwd, int64_t B, int64_t N, int64_t D, int flags, unsigned grid) {
  using namespace fastcl;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto u = to_dtype<T>(read<float>("u.f32", B * D));
  const auto v = to_dtype<T>(read<float>("v.f32", N * D));
  const auto scale = read<float>("scale.f32", 1);
  const auto labels = read<int64_t>("labels.i64", B, true);
  const auto row_cls = read<int64_t>("row_cls.i64", B, true);
  const auto col_cls = read<int64_t>("col_cls.i64", N, true);
  if (fwd_smem<T>() > sizeof(smem) || bwd_smem<T>(512) > sizeof(smem)) return 3;
  if (fwd) {
    std::vector<float> row_stats(4 * B, nan), col_m(grid * N, NEG), col_l(grid * N, 0.f);
    const bool has_col = flags & HAS_COL;
    emu::launch(grid, THREADS, [&] {
      lse_fwd_kernel<T, WG>(u.data(), v.data(), scale.data(), ptr_or_null(labels), ptr_or_null(row_cls),
                        ptr_or_null(col_cls), row_stats.data(), has_col ? col_m.data() : nullptr,
                        has_col ? col_l.data() : nullptr, B, N, D, flags);
    });
    write("row_stats.out", row_stats);
    write("col_m.out", col_m);
    write("col_l.out", col_l);
    return 0;
  }
  const auto row_stats = read<float>("row_stats.f32", 4 * B);
  const bool has_col = flags & HAS_COL;
  const auto col_stats = read<float>("col_stats.f32", has_col ? 2 * N : 0);
  const auto g_row = read<float>("g_row.f32", B);
  const auto g_col = has_col ? read<float>("g_col.f32", N) : g_row;
  const auto amp = read<float>("amp.f32", 1);
  auto smooth = read<float>("smooth.f32", 2, true);
  if (smooth.empty()) smooth = {1.f, 0.f};
  const auto ctr = read<float>("ctr.f32", B + (has_col ? N : 0), true);
  const float* ctr_p = ctr.empty() ? nullptr : ctr.data();
  const int64_t n_rb = (B + BM - 1) / BM, n_cb = (N + BM - 1) / BM;
  std::vector<T> du(B * D, from_f<T>(nan)), dv(N * D, from_f<T>(nan));
  std::vector<float> dscale(n_rb, nan);
  const char* limit_env = std::getenv("FASTCL_EMU_SMEM");
  const size_t limit = limit_env ? std::strtoull(limit_env, nullptr, 10) : sizeof(smem);
  int slab = 0;
  with_slab<T>(D, limit, [&](auto bd) {  // the launcher's choice of D-slab
    constexpr int BD = decltype(bd)::value;
    slab = BD;
    if (bwd_smem<T>(BD) > limit) return;  // the launcher's set_smem raises
    emu::launch(n_rb, THREADS, [&] {
      grad_kernel<T, BD, WG>(u.data(), v.data(), scale.data(), amp.data(), row_stats.data(), col_stats.data(),
                         g_row.data(), g_col.data(), ptr_or_null(labels), ptr_or_null(row_cls), ptr_or_null(col_cls),
                         du.data(), dscale.data(), B, N, D, B, N, flags, smooth[0], smooth[1], ctr_p);
    });
    emu::launch(n_cb, THREADS, [&] {
      grad_kernel<T, BD, WG>(v.data(), u.data(), scale.data(), amp.data(), row_stats.data(), col_stats.data(),
                         g_row.data(), g_col.data(), ptr_or_null(labels), ptr_or_null(row_cls), ptr_or_null(col_cls),
                         dv.data(), dscale.data(), N, B, D, B, N, flags | TRANSPOSED, smooth[0], smooth[1], ctr_p);
    });
  });
  if (bwd_smem<T>(slab) > limit) return 4;
  std::vector<float> duf(du.size()), dvf(dv.size());
  for (size_t i = 0; i < du.size(); ++i) duf[i] = emu::to_float(du[i]);
  for (size_t i = 0; i < dv.size(); ++i) dvf[i] = emu::to_float(dv[i]);
  write("du.out", duf);
  write("dv.out", dvf);
  write("dscale.out", dscale);
  write("slab.out", {(float)slab});
  return 0;
}

}  // namespace

int run_ns(int64_t G, int g, int iters) {
  const auto S = read<float>("S.f32", G * g * g);
  std::vector<float> W(G * g * g, std::numeric_limits<float>::quiet_NaN());
  if (g > fastcl::NS_MAX_G || fastcl::newton_schulz_smem(g) > sizeof(fastcl::smem)) return 3;
  emu::launch((unsigned)G, fastcl::THREADS, [&] { fastcl::newton_schulz_kernel(S.data(), W.data(), g, iters); });
  write("W.out", W);
  return 0;
}

int main(int argc, char** argv) {
  emu::set_smem(fastcl::smem, sizeof(fastcl::smem));
  if (argc == 6 && std::string(argv[1]) == "ns") {
    g_dir = argv[5];
    return run_ns(std::atoll(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]));
  }
  const bool wg = argc == 10 && std::string(argv[9]) == "wg";
  if (argc != 9 && !wg) {
    std::fprintf(stderr, "usage: %s fwd|bwd f32|f16|bf16 B N D flags grid DIR [wg]\n", argv[0]);
    return 2;
  }
  const bool fwd = std::string(argv[1]) == "fwd";
  const std::string dt = argv[2];
  const int64_t B = std::atoll(argv[3]), N = std::atoll(argv[4]), D = std::atoll(argv[5]);
  const int flags = std::atoi(argv[6]);
  const unsigned grid = (unsigned)std::atoi(argv[7]);
  g_dir = argv[8];
  if (dt == "f32" && !wg) return run<float, false>(fwd, B, N, D, flags, grid);
  if (dt == "f16") return wg ? run<__half, true>(fwd, B, N, D, flags, grid) : run<__half, false>(fwd, B, N, D, flags, grid);
  if (dt == "bf16")
    return wg ? run<__nv_bfloat16, true>(fwd, B, N, D, flags, grid) : run<__nv_bfloat16, false>(fwd, B, N, D, flags, grid);
  std::fprintf(stderr, "unknown dtype %s\n", dt.c_str());
  return 2;
}
