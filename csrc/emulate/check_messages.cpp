// Prints fastcl::msg / FASTCL_CHECK messages for every argument type the launchers pass, for
// tests/test_cpp_checks.py. Built with g++ against the installed torch's headers and libraries.
#include <cstdio>

#include "../check.h"
#include <ATen/ops/zeros.h>  // check.h takes only ATen/core/Tensor.h

int main() {
  const at::Tensor t = at::zeros({3, 5});
  const int64_t n = 7;
  const size_t bytes = 123456;
  const int major = 9;
  const char name[8] = "H100";  // a char array, as cudaDeviceProp::name is
  std::puts(fastcl::msg("u is [", t.size(0), ", ", t.size(1), "], shape ", t.sizes(), " on ", t.device(),
                        ", ", t.scalar_type(), ", ", bytes, " bytes, ", name, " is ", major, ".", 0, ", ",
                        c10::Device("cuda:1"), ", eps ", 0.25, std::string(" end"))
                .c_str());
  try {
    FASTCL_CHECK(n == 8, "n must be 8, got ", n, " for ", t.sizes());
  } catch (const c10::Error& e) {
    std::puts(e.what_without_backtrace());
  }
  FASTCL_CHECK(n == 7, "never built");
  std::puts("passing check: no throw");
  return 0;
}
