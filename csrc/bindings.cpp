// Op registration (torch.library, so the ops work under torch.compile) and a small pybind11
// module (build information), plus the C++ input checks.
// Not <torch/extension.h>: it includes all of torch's C++ API, which took 40 of this file's 53 s
// to compile; these are what is used (the module passes no tensors through pybind11).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "info_nce.h"
#include "check.h"


namespace fastcl {

namespace {

void check_cuda_2d(const at::Tensor& t, const char* name) {
  FASTCL_CHECK(t.is_cuda(), "fastcl_cuda: ", name, " must be a CUDA tensor, got one on ", t.device());
  FASTCL_CHECK(t.dim() == 2, "fastcl_cuda: ", name, " must be 2-D [rows, D], got shape ", t.sizes());
  FASTCL_CHECK(t.is_contiguous(), "fastcl_cuda: ", name, " must be contiguous (call .contiguous())");
  const auto dt = t.scalar_type();
  FASTCL_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "fastcl_cuda: ", name,
              " must be float16, bfloat16 or float32, got ", dt);
}

void check_index(const c10::optional<at::Tensor>& t, const char* name, int64_t n, const at::Tensor& like) {
  if (!t.has_value()) return;
  FASTCL_CHECK(t->scalar_type() == at::kLong, "fastcl_cuda: ", name, " must be int64, got ", t->scalar_type());
  FASTCL_CHECK(t->device() == like.device(), "fastcl_cuda: ", name, " is on ", t->device(),
              " but the embeddings are on ", like.device());
  FASTCL_CHECK(t->dim() == 1 && t->size(0) == n, "fastcl_cuda: ", name, " must have shape [", n,
              "], got ", t->sizes());
  FASTCL_CHECK(t->is_contiguous(), "fastcl_cuda: ", name, " must be contiguous");
}

void check_stats(const at::Tensor& t, const char* name, int64_t rows, int64_t n, const at::Tensor& like) {
  FASTCL_CHECK(t.scalar_type() == at::kFloat && t.device() == like.device(), "fastcl_cuda: ", name,
              " must be float32 on ", like.device(), ", got ", t.scalar_type(), " on ", t.device());
  FASTCL_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n, "fastcl_cuda: ", name,
              " must have shape [", rows, ", ", n, "], got ", t.sizes());
}

}  // namespace

void check_forward_inputs(const at::Tensor& u, const at::Tensor& v, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& labels,
                          const c10::optional<at::Tensor>& row_cls,
                          const c10::optional<at::Tensor>& col_cls, bool symmetric, bool exclude_diag,
                          bool exclude_pos) {
  check_cuda_2d(u, "u");
  check_cuda_2d(v, "v");
  FASTCL_CHECK(u.device() == v.device(), "fastcl_cuda: u is on ", u.device(), " but v is on ", v.device());
  FASTCL_CHECK(u.scalar_type() == v.scalar_type(), "fastcl_cuda: u and v must have one dtype, got ",
              u.scalar_type(), " and ", v.scalar_type());
  FASTCL_CHECK(u.size(1) == v.size(1), "fastcl_cuda: u is [", u.size(0), ", ", u.size(1), "] but v is [",
              v.size(0), ", ", v.size(1), "]: the embedding dims differ");
  FASTCL_CHECK(scale.numel() == 1 && scale.device() == u.device() && at::isFloatingType(scale.scalar_type()),
              "fastcl_cuda: scale must be a 1-element floating tensor on ", u.device());
  FASTCL_CHECK(!symmetric || v.size(0) == u.size(0), "fastcl_cuda: symmetric needs as many keys as queries, got B=",
              u.size(0), ", N=", v.size(0));
  FASTCL_CHECK(row_cls.has_value() == col_cls.has_value(), "fastcl_cuda: row_cls and col_cls go together");
  FASTCL_CHECK(!(symmetric && (labels.has_value() || row_cls.has_value() || exclude_diag || exclude_pos)),
              "fastcl_cuda: the symmetric (column) term is defined without labels, class ids or exclusions");
  check_index(labels, "labels", u.size(0), u);
  check_index(row_cls, "row_cls", u.size(0), u);
  check_index(col_cls, "col_cls", v.size(0), u);
  const auto* prop = at::cuda::getDeviceProperties(u.device().index());
  FASTCL_CHECK(prop->major >= 8, "fastcl_cuda: the kernels need compute capability 8.0 or newer, ",
              prop->name, " is ", prop->major, ".", prop->minor, "; use backend='triton' or 'torch'");
}

void check_backward_inputs(const at::Tensor& u, const at::Tensor& v, const at::Tensor& row_stats,
                           const at::Tensor& col_stats, const at::Tensor& g_row,
                           const at::Tensor& g_col, const at::Tensor& amp, bool symmetric) {
  const int64_t B = u.size(0), N = v.size(0);
  check_stats(row_stats, "row_stats", 4, B, u);
  check_stats(col_stats, "col_stats", 2, symmetric ? N : 0, u);
  FASTCL_CHECK(g_row.dim() == 1 && g_row.size(0) == B && g_row.device() == u.device(),
              "fastcl_cuda: g_row must be [", B, "] on ", u.device(), ", got ", g_row.sizes());
  FASTCL_CHECK(!symmetric || (g_col.dim() == 1 && g_col.size(0) == N && g_col.device() == u.device()),
              "fastcl_cuda: g_col must be [", N, "] on ", u.device(), ", got ", g_col.sizes());
  FASTCL_CHECK(amp.numel() == 1 && amp.scalar_type() == at::kFloat && amp.device() == u.device(),
              "fastcl_cuda: amp must be one float32 on ", u.device(), " (fastcl._common.grad_amp), got ",
              amp.sizes(), " ", amp.scalar_type(), " on ", amp.device());
}

void check_smoothing(double label_smoothing, bool excluding, const c10::optional<at::Tensor>& centres,
                     const at::Tensor& like, int64_t n) {
  FASTCL_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0, "fastcl_cuda: label_smoothing must be in [0, 1), got ",
              label_smoothing);
  FASTCL_CHECK(label_smoothing == 0.0 || !excluding, "fastcl_cuda: label_smoothing needs every column to be a "
              "negative (no exclusions or class ids), got ", label_smoothing);
  if (label_smoothing == 0.0) return;
  FASTCL_CHECK(centres.has_value() && centres->scalar_type() == at::kFloat && centres->device() == like.device() &&
                  centres->dim() == 1 && centres->size(0) == n && centres->is_contiguous(),
              "fastcl_cuda: label_smoothing needs centres, contiguous float32 [", n, "] on ", like.device(),
              " (fastcl.chunked.smoothing_centres)");
}

}  // namespace fastcl

TORCH_LIBRARY(fastcl_cuda, m) {
  m.def("lse_forward(Tensor u, Tensor v, Tensor scale, Tensor? labels, Tensor? row_cls, Tensor? col_cls, "
        "bool symmetric, bool exclude_diag, bool exclude_pos) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lse_backward(Tensor u, Tensor v, Tensor scale, Tensor row_stats, Tensor col_stats, Tensor g_row, "
        "Tensor g_col, Tensor amp, Tensor? labels, Tensor? row_cls, Tensor? col_cls, bool symmetric, bool exclude_diag, "
        "bool exclude_pos, float label_smoothing=0.0, Tensor? centres=None) -> (Tensor, Tensor, Tensor)");
  m.def("newton_schulz(Tensor S, int iters) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastcl_cuda, CUDA, m) {
  m.impl("lse_forward", &fastcl::lse_forward_cuda);
  m.impl("lse_backward", &fastcl::lse_backward_cuda);
  m.impl("newton_schulz", &fastcl::newton_schulz_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl CUDA C++ kernels; the ops live in torch.ops.fastcl_cuda";
  m.def("compiled_archs", &fastcl::compiled_archs,
        "The SM architectures this binary holds kernels for, e.g. '800,900' (nvcc's __CUDA_ARCH_LIST__)");
  m.def("wgmma_available", &fastcl::wgmma_available,
        "Whether the current GPU runs this build's sm_90a code: the 16-bit kernels' score tiles on "
        "wgmma (with FASTCL_CUDA_WGMMA=1)");
  m.def("wgmma_enabled", &fastcl::wgmma_enabled,
        "Whether the 16-bit kernels take the wgmma path now: FASTCL_CUDA_WGMMA=1 (true, on, yes) and "
        "wgmma_available(); without the opt-in, False without asking the GPU");
}
