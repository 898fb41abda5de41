// Input-check messages built without std::ostream.
//
// On the lent H100 the extension was built by a g++ (/opt/gcc) that put some libstdc++ code in
// fastcl/_C.so itself; an ostream there formatting an integer then segfaulted (in a TORCH_CHECK
// message naming a shape). TORCH_CHECK passes a single std::string through untouched, so
// messages are put together here with std::to_string and string appends only.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace fastcl {
namespace detail {
inline void put(std::string& s, const char* x) { s += x; }
inline void put(std::string& s, const std::string& x) { s += x; }
inline void put(std::string& s, char x) { s += x; }
inline void put(std::string& s, int x) { s += std::to_string(x); }
inline void put(std::string& s, long x) { s += std::to_string(x); }
inline void put(std::string& s, long long x) { s += std::to_string(x); }
inline void put(std::string& s, unsigned long x) { s += std::to_string(x); }
inline void put(std::string& s, unsigned long long x) { s += std::to_string(x); }
inline void put(std::string& s, double x) { s += std::to_string(x); }  // "%f": 0.100000
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
inline void put(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, c10::IntArrayRef shape) {
  s += '[';
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += ']';
}
}  // namespace detail

template <typename... A>
std::string msg(const A&... parts) {
  std::string s;
  (detail::put(s, parts), ...);
  return s;
}
}  // namespace fastcl

// TORCH_CHECK with a message from fastcl::msg: the message is only built when the check fails.
#define FASTCL_CHECK(cond, ...)                         \
  do {                                                  \
    if (!(cond)) TORCH_CHECK(false, ::fastcl::msg(__VA_ARGS__)); \
  } while (0)
