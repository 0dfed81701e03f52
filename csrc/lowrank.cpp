// The `lowrank` op namespace. Each op family declares its schemas with TORCH_LIBRARY_FRAGMENT in
// its own file (sep_conv.cpp, batched_svd.cpp, ...) next to its CPU kernels. Loading the library
// (torch.ops.load_library in Python, linking or dlopen in C++) runs these static registrations;
// nothing here needs Python.
#include <torch/library.h>

TORCH_LIBRARY(lowrank, m) {}
