// Which of our hand-written SIMD paths this process may use, decided once at run time.
//
// The level is the highest the CPU supports (__builtin_cpu_supports), capped by the
// environment variable LOWRANK_CPU_CAPABILITY=default|avx2|avx512 (read once, on first use;
// like PyTorch's ATEN_CPU_CAPABILITY). "default" means portable scalar code only. The tests use
// the variable to run every path the machine has. oneDNN's generated kernels are capped
// separately, by ONEDNN_MAX_CPU_ISA.
#pragma once

#include <cstdlib>
#include <cstring>

namespace lowrank {

enum class CpuCapability { Default = 0, AVX2 = 1, AVX512 = 2 };

inline CpuCapability detect_cpu_capability() {
  CpuCapability hw = CpuCapability::Default;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) hw = CpuCapability::AVX2;
  if (hw == CpuCapability::AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    hw = CpuCapability::AVX512;
#endif
  CpuCapability cap = CpuCapability::AVX512;
  if (const char* env = std::getenv("LOWRANK_CPU_CAPABILITY")) {
    if (std::strcmp(env, "default") == 0) cap = CpuCapability::Default;
    else if (std::strcmp(env, "avx2") == 0) cap = CpuCapability::AVX2;
    // "avx512" or anything else: no cap beyond what the CPU has.
  }
  return static_cast<int>(cap) < static_cast<int>(hw) ? cap : hw;
}

// The level, computed on the first call (thread-safe static initialization).
inline CpuCapability cpu_capability() {
  static const CpuCapability level = detect_cpu_capability();
  return level;
}

}  // namespace lowrank
