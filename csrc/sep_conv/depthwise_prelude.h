// Everything the depthwise kernels use from outside the project, included by each
// depthwise_<isa>.cpp before its target pragma.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "depthwise_isa.h"
