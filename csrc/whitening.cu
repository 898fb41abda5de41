// Host launcher of group whitening's Newton-Schulz kernel (whitening_kernels.cuh).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/full_like.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "info_nce.h"
#include "whitening_kernels.cuh"
#include "check.h"

namespace fastcl {

at::Tensor newton_schulz_cuda(const at::Tensor& S, int64_t iters) {
  FASTCL_CHECK(S.is_cuda(), "fastcl_cuda.newton_schulz: S must be a CUDA tensor, got one on ", S.device());
  FASTCL_CHECK(S.scalar_type() == at::kFloat, "fastcl_cuda.newton_schulz: S must be float32, got ", S.scalar_type());
  FASTCL_CHECK(S.dim() == 3 && S.size(1) == S.size(2), "fastcl_cuda.newton_schulz: S must be [G, g, g], got ",
              S.sizes());
  const int64_t G = S.size(0), g = S.size(1);
  FASTCL_CHECK(g >= 1 && g <= NS_MAX_G, "fastcl_cuda.newton_schulz: group size ", g, " is outside 1..", NS_MAX_G);
  // The kernel counts in int: a larger count would wrap, not run longer.
  FASTCL_CHECK(iters >= 0 && iters <= std::numeric_limits<int>::max(),
              "fastcl_cuda.newton_schulz: iters must be in [0, 2^31), got ", iters);
  const c10::cuda::CUDAGuard guard(S.device());
  const size_t bytes = newton_schulz_smem((int)g);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  FASTCL_CHECK(bytes <= prop->sharedMemPerBlockOptin, "fastcl_cuda.newton_schulz: group size ", g, " needs ",
              bytes, " bytes of shared memory, ", prop->name, " has ", prop->sharedMemPerBlockOptin,
              " per block; use backend='triton' or 'torch'");
  at::Tensor s = S.contiguous();
  at::Tensor W = at::full_like(s, NAN);  // poisoned: every element must be written
  if (G == 0) return W;
  set_smem_bytes(reinterpret_cast<const void*>(newton_schulz_kernel), bytes);  // a build without this GPU's code says so
  newton_schulz_kernel<<<(unsigned)G, THREADS, bytes, at::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<float>(), W.data_ptr<float>(), (int)g, (int)iters);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return W;
}

}  // namespace fastcl
