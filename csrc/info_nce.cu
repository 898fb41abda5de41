// Host launchers of the fused InfoNCE kernels (info_nce_kernels.cuh), the `cuda` backend.
// Tensor and the handful of ops used, not <ATen/ATen.h> (every op's header): a third of the
// compile time of this file.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <cctype>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>

#include "info_nce.h"
#include "info_nce_kernels.cuh"
#include "check.h"

namespace fastcl {

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
void set_smem_bytes(const void* kernel, size_t bytes) {
  // sm_86/sm_89 allow 99 KiB per block (sm_80 163, sm_90 227): the fp32 backward needs more
  // there (the 16-bit one takes thinner slabs, with_slab).
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  FASTCL_CHECK(bytes <= prop->sharedMemPerBlockOptin, "fastcl_cuda: this kernel needs ", bytes,
              " bytes of shared memory per block, ", prop->name, " has ", prop->sharedMemPerBlockOptin,
              "; use backend='triton' or 'torch'");
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  // A build without code for this GPU: usually "no kernel image" (209), on some drivers
  // "invalid device function".
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // clear it: the caller gets a clear message instead
    FASTCL_CHECK(false, "fastcl_cuda: this build has no kernels for this GPU (built for sm ", compiled_archs(),
                "); rebuild with TORCH_CUDA_ARCH_LIST naming its compute capability");
  }
  C10_CUDA_CHECK(err);
}

namespace {

constexpr double LN2 = 0.6931471805599453;

template <typename F> void set_smem(F* kernel, size_t bytes) {
  set_smem_bytes(reinterpret_cast<const void*>(kernel), bytes);
}

const int64_t* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

template <typename T, typename AT> const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr<AT>());
}
template <typename T, typename AT> T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<AT>());
}

int make_flags(bool symmetric, bool labels, bool exclude_diag, bool exclude_pos, bool multi) {
  return (symmetric ? HAS_COL : 0) | (labels ? HAS_LABELS : 0) | (exclude_diag ? EXCL_DIAG : 0) |
         (exclude_pos ? EXCL_POS : 0) | (multi ? MULTI_POS : 0);
}

// Dispatch on the input dtype; T is the device type, AT the ATen storage type.
#define FASTCL_DISPATCH(dtype, ...)                                                   \
  [&] {                                                                               \
    if ((dtype) == at::kHalf) {                                                       \
      using T = __half;                                                               \
      using AT = at::Half;                                                            \
      return __VA_ARGS__();                                                           \
    } else if ((dtype) == at::kBFloat16) {                                            \
      using T = __nv_bfloat16;                                                        \
      using AT = at::BFloat16;                                                        \
      return __VA_ARGS__();                                                           \
    } else {                                                                          \
      using T = float;                                                                \
      using AT = float;                                                               \
      return __VA_ARGS__();                                                           \
    }                                                                                 \
  }()

// The kernels' wgmma variant where FASTCL_CUDA_WGMMA=1 asks for it and the GPU runs this build's
// sm_90a code; else the WMMA one (the same results up to fp32 summation order).
// f(std::bool_constant<WG>{}); fp32 inputs have no wgmma variant.
template <typename T, typename F> void with_wg(F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (wgmma_enabled()) return f(std::true_type{});
  }
  f(std::false_type{});
}

#define FASTCL_STR2(...) #__VA_ARGS__
#define FASTCL_STR(...) FASTCL_STR2(__VA_ARGS__)

}  // namespace

// Which code the current GPU runs: 1 where the build holds sm_90a code and the GPU is one it runs
// on (the driver picks it over the sm_80 code on compute capability 9.0).
__global__ void wgmma_probe(int* out) {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
  *out = 1;
#else
  *out = 0;
#endif
}

bool wgmma_available() {
  static std::mutex mu;
  static std::map<int, bool> known;  // per device, probed once
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it != known.end()) return it->second;
  // The probe reads its answer back to the host, which a stream being captured cannot do (the
  // capture would be invalidated with a bare CUDA error).
  FASTCL_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "fastcl_cuda: with FASTCL_CUDA_WGMMA=1 the first 16-bit call on a GPU probes it for wgmma, "
              "which cannot run during CUDA graph capture; make one call before capturing");
  at::Tensor out = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, dev));
  wgmma_probe<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<int>());
  bool ok = false;
  if (cudaGetLastError() == cudaSuccess) {  // no code for this GPU at all: set_smem says so later
    ok = out.item<int>() == 1;
  }
  known[dev] = ok;
  return ok;
}

bool wgmma_enabled() {
  // Opt-in, with 1, true, on or yes (any case): on the H100 (2026-11-24) the wgmma score tiles
  // were slower than WMMA's, 110 against 99 ms fwd+bwd at B = 32768, D = 512, bf16.
  const char* env = std::getenv("FASTCL_CUDA_WGMMA");
  if (!env) return false;
  std::string v(env);
  for (auto& c : v) c = (char)std::tolower((unsigned char)c);
  if (v != "1" && v != "true" && v != "on" && v != "yes") return false;
  return wgmma_available();
}

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FASTCL_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward_cuda(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& scale,
    const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& row_cls,
    const c10::optional<at::Tensor>& col_cls, bool symmetric, bool exclude_diag, bool exclude_pos) {
  check_forward_inputs(u, v, scale, labels, row_cls, col_cls, symmetric, exclude_diag, exclude_pos);
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t B = u.size(0), D = u.size(1), N = v.size(0);
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t n_rb = (B + BM - 1) / BM;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(n_rb, 2 * sms));
  // Poisoned: a row the kernel fails to write shows up as NaN, not as a plausible number.
  at::Tensor row_stats = at::full({4, B}, NAN, f32);
  at::Tensor col_m = symmetric ? at::full({P, N}, NEG, f32) : at::empty({0}, f32);
  at::Tensor col_l = symmetric ? at::zeros({P, N}, f32) : at::empty({0}, f32);
  const int flags = make_flags(symmetric, labels.has_value(), exclude_diag, exclude_pos, row_cls.has_value());
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor scale32 = scale.to(at::kFloat).reshape({1}).contiguous();

  if (B > 0) {  // N == 0 too, as Triton: every row is written (max NEG, log-sum -inf)
    FASTCL_DISPATCH(u.scalar_type(), [&] {
      with_wg<T>([&](auto wg) {
        constexpr bool WG = decltype(wg)::value;
        const size_t sm = fwd_smem<T>();
        set_smem(lse_fwd_kernel<T, WG>, sm);
        lse_fwd_kernel<T, WG><<<(unsigned)P, THREADS, sm, stream>>>(
            cptr<T, AT>(u), cptr<T, AT>(v), scale32.data_ptr<float>(), opt_ptr(labels),
            opt_ptr(row_cls), opt_ptr(col_cls), row_stats.data_ptr<float>(),
            symmetric ? col_m.data_ptr<float>() : nullptr, symmetric ? col_l.data_ptr<float>() : nullptr,
            B, N, D, flags);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  at::Tensor m = row_stats[0], logl = row_stats[1], pos = row_stats[2];
  at::Tensor row_loss = m.sub(pos).add_(logl).mul_(LN2);  // ((m - pos) + logl) * LN2
  if (!symmetric) return {row_loss, row_loss.new_empty({0}), row_stats, row_stats.new_empty({2, 0})};
  // Merge the P partial column statistics; the positive of column j is S_jj = row j's.
  at::Tensor cm = std::get<0>(col_m.max(0));
  at::Tensor cl = col_l.mul(col_m.sub(cm).exp2_()).sum(0);
  at::Tensor col_stats = at::stack({cm, cl.log2()});
  at::Tensor col_loss = cm.sub(pos).add_(col_stats[1]).mul_(LN2);
  return {row_loss, col_loss, row_stats, col_stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cuda(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& scale, const at::Tensor& row_stats,
    const at::Tensor& col_stats, const at::Tensor& g_row_in, const at::Tensor& g_col_in,
    const at::Tensor& amp_in, const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& row_cls,
    const c10::optional<at::Tensor>& col_cls, bool symmetric, bool exclude_diag, bool exclude_pos,
    double label_smoothing, const c10::optional<at::Tensor>& centres) {
  check_forward_inputs(u, v, scale, labels, row_cls, col_cls, symmetric, exclude_diag, exclude_pos);
  check_backward_inputs(u, v, row_stats, col_stats, g_row_in, g_col_in, amp_in, symmetric);
  check_smoothing(label_smoothing, row_cls.has_value() || exclude_diag || exclude_pos, centres, u,
                  u.size(0) + (symmetric ? v.size(0) : 0));
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t B = u.size(0), D = u.size(1), N = v.size(0);
  at::Tensor g_row = g_row_in.to(at::kFloat).contiguous();
  at::Tensor g_col = symmetric ? g_col_in.to(at::kFloat).contiguous() : g_row;
  at::Tensor scale32 = scale.to(at::kFloat).reshape({1}).contiguous();
  at::Tensor rs = row_stats.contiguous(), cs = col_stats.contiguous();
  at::Tensor amp = amp_in.reshape({1}).contiguous();  // the caller's power of two (fastcl._common.grad_amp)
  // Poisoned outputs: every element must be written by the kernels.
  at::Tensor du = at::full_like(u, NAN), dv = at::full_like(v, NAN);
  const int64_t n_rb = (B + BM - 1) / BM, n_cb = (N + BM - 1) / BM;
  const bool launch = B > 0 && N > 0 && D > 0;  // else dU, dV and d scale are all zero
  at::Tensor dscale = at::full({std::max<int64_t>(n_rb, 1)}, launch ? NAN : 0.f, u.options().dtype(at::kFloat));
  const int flags = make_flags(symmetric, labels.has_value(), exclude_diag, exclude_pos, row_cls.has_value());
  // Label smoothing's targets in G (as fastcl.chunked.smoothing_weights): 1 - eps on the
  // positive, eps / N on every column; (1, 0) leaves G as without smoothing, bit for bit.
  const bool smooth = label_smoothing != 0.0 && N > 0;
  const float pos_w = smooth ? (float)(1.0 - label_smoothing) : 1.f;
  const float uni_w = smooth ? (float)(label_smoothing / (double)N) : 0.f;
  const float* ctr = smooth ? centres->data_ptr<float>() : nullptr;  // else: centred on the positive
  auto stream = at::cuda::getCurrentCUDAStream();

  if (launch) {
    FASTCL_DISPATCH(u.scalar_type(), [&] {
      with_wg<T>([&](auto wg) {
        constexpr bool WG = decltype(wg)::value;
        with_slab<T>(D, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin, [&](auto bd) {
          constexpr int BD = decltype(bd)::value;
          const size_t sm = bwd_smem<T>(BD);
          set_smem(grad_kernel<T, BD, WG>, sm);
          grad_kernel<T, BD, WG><<<(unsigned)n_rb, THREADS, sm, stream>>>(
              cptr<T, AT>(u), cptr<T, AT>(v), scale32.data_ptr<float>(), amp.data_ptr<float>(),
              rs.data_ptr<float>(), cs.data_ptr<float>(), g_row.data_ptr<float>(), g_col.data_ptr<float>(),
              opt_ptr(labels), opt_ptr(row_cls), opt_ptr(col_cls), mptr<T, AT>(du),
              dscale.data_ptr<float>(), B, N, D, B, N, flags, pos_w, uni_w, ctr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          grad_kernel<T, BD, WG><<<(unsigned)n_cb, THREADS, sm, stream>>>(
              cptr<T, AT>(v), cptr<T, AT>(u), scale32.data_ptr<float>(), amp.data_ptr<float>(),
              rs.data_ptr<float>(), cs.data_ptr<float>(), g_row.data_ptr<float>(), g_col.data_ptr<float>(),
              opt_ptr(labels), opt_ptr(row_cls), opt_ptr(col_cls), mptr<T, AT>(dv),
              dscale.data_ptr<float>(), N, B, D, B, N, flags | TRANSPOSED, pos_w, uni_w, ctr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  } else {
    du.zero_();
    dv.zero_();
  }
  return {du, dv, dscale.sum()};
}

}  // namespace fastcl
