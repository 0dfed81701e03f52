// Which instruction-set level the hand-written SIMD kernels run at, chosen once per process.
//
// The level is the highest the CPU supports (__builtin_cpu_supports, which also checks that the
// OS saves the vector registers), capped by LOWRANK_CPU_CAPABILITY=default|avx2|avx512 when that
// is set (like PyTorch's ATEN_CPU_CAPABILITY): tests use it to run every path the machine has.
// Asking for a level above the CPU's gives the CPU's level and a warning; any other value is a
// ValueError at the first kernel call. Off x86-64 the level is always Default (portable code).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

namespace lowrank {

enum class CpuCapability { Default = 0, AVX2 = 1, AVX512 = 2 };

inline const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::AVX512:
      return "avx512";
    case CpuCapability::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

namespace detail {

// The CPU's own level: AVX2 needs AVX2 + FMA; AVX512 the x86-64-v4 set (F, DQ, VL, BW) as well.
inline CpuCapability cpu_supported_capability() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return avx512 ? CpuCapability::AVX512 : avx2 ? CpuCapability::AVX2 : CpuCapability::Default;
#else
  return CpuCapability::Default;
#endif
}

inline CpuCapability resolve_cpu_capability() {
  const CpuCapability supported = cpu_supported_capability();
  const char* env = std::getenv("LOWRANK_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return supported;
  std::string value(env);
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char ch) { return std::tolower(ch); });
  CpuCapability requested;
  if (value == "default") {
    requested = CpuCapability::Default;
  } else if (value == "avx2") {
    requested = CpuCapability::AVX2;
  } else if (value == "avx512") {
    requested = CpuCapability::AVX512;
  } else {
    TORCH_CHECK_VALUE(false, "LOWRANK_CPU_CAPABILITY must be one of default, avx2, avx512 (or unset), got '", env, "'");
  }
  if (requested > supported) {
    TORCH_WARN("LOWRANK_CPU_CAPABILITY=", env, " asks for more than this CPU supports; using ",
               cpu_capability_name(supported));
    return supported;
  }
  return requested;
}

}  // namespace detail

// The level in effect, resolved on the first call (thread-safe; an invalid
// LOWRANK_CPU_CAPABILITY throws on every call until it is fixed).
inline CpuCapability cpu_capability() {
  static const CpuCapability level = detail::resolve_cpu_capability();
  return level;
}

}  // namespace lowrank
