// Everything the batched SVD kernels use from outside the project, included by each
// batched_svd_<isa>.cpp before its target pragma.
#pragma once

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "batched_svd_isa.h"
