// The CUDA backend's ops and their input checks (shared by the .cu launchers and the bindings).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastcl {

// Per-row InfoNCE terms of S = scale * u @ v.T and their O(B + N) statistics; see
// fastcl/cuda_backend.py for the contract (identical to the Triton backend's).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward_cuda(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& scale,
    const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& row_cls,
    const c10::optional<at::Tensor>& col_cls, bool symmetric, bool exclude_diag, bool exclude_pos);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cuda(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& scale, const at::Tensor& row_stats,
    const at::Tensor& col_stats, const at::Tensor& g_row, const at::Tensor& g_col, const at::Tensor& amp,
    const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& row_cls,
    const c10::optional<at::Tensor>& col_cls, bool symmetric, bool exclude_diag, bool exclude_pos,
    double label_smoothing, const c10::optional<at::Tensor>& centres);

// TORCH_CHECKs with messages that name the argument and what was expected.
void check_forward_inputs(const at::Tensor& u, const at::Tensor& v, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& labels,
                          const c10::optional<at::Tensor>& row_cls,
                          const c10::optional<at::Tensor>& col_cls, bool symmetric, bool exclude_diag,
                          bool exclude_pos);
void check_backward_inputs(const at::Tensor& u, const at::Tensor& v, const at::Tensor& row_stats,
                           const at::Tensor& col_stats, const at::Tensor& g_row,
                           const at::Tensor& g_col, const at::Tensor& amp, bool symmetric);
// label_smoothing in [0, 1), and 0 where some columns are not negatives (exclusions, class ids);
// with it, centres float32 [n] on like's device (fastcl.chunked.smoothing_centres).
void check_smoothing(double label_smoothing, bool excluding, const c10::optional<at::Tensor>& centres,
                     const at::Tensor& like, int64_t n);

// Group whitening: W ~= S^-1/2 for S [G, g, g] float32 SPD, g <= 128, by the coupled
// Newton-Schulz iteration (csrc/whitening.cu).
at::Tensor newton_schulz_cuda(const at::Tensor& S, int64_t iters);

// nvcc's __CUDA_ARCH_LIST__ for this build, e.g. "800,900" (sm_90a shows as 900).
const char* compiled_archs();

// Lets `kernel` use `bytes` of dynamic shared memory, with clear errors where the GPU has less
// or where this build has no code for the GPU (csrc/info_nce.cu).
void set_smem_bytes(const void* kernel, size_t bytes);

// Whether the current GPU runs this build's sm_90a code, where the 16-bit kernels can compute
// their score tiles with wgmma; and whether they do (only with FASTCL_CUDA_WGMMA=1).
bool wgmma_available();
bool wgmma_enabled();

}  // namespace fastcl
