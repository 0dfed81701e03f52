# CMake package config of the lowrank_kernels op library (liblowrank_ops.so: the `lowrank` ops, their
# CPU kernels and registrations, no Python). Point CMAKE_PREFIX_PATH at
#   python -c "import torch, lowrank_kernels; print(torch.utils.cmake_prefix_path + ';' + lowrank_kernels.cmake_prefix_path)"
# and then:
#   find_package(Torch REQUIRED)
#   find_package(LowrankKernels REQUIRED)
#   target_link_libraries(app PRIVATE "${TORCH_LIBRARIES}" LowrankKernels::lowrank_ops)
# The library was compiled against the torch of the same Python environment: use that libtorch.
#
# Sets LowrankKernels_LIBRARY (the library's path) and the imported target LowrankKernels::lowrank_ops.

get_filename_component(_lowrank_package_dir "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(LowrankKernels_LIBRARY "${_lowrank_package_dir}/lib/liblowrank_ops.so")

if(NOT EXISTS "${LowrankKernels_LIBRARY}")
  set(LowrankKernels_FOUND FALSE)
  set(LowrankKernels_NOT_FOUND_MESSAGE
      "${LowrankKernels_LIBRARY} does not exist: build lowrank_kernels first "
      "(pip install --no-build-isolation . or python setup.py build_ext --inplace).")
  return()
endif()

if(NOT TARGET LowrankKernels::lowrank_ops)
  add_library(LowrankKernels::lowrank_ops SHARED IMPORTED)
  set_target_properties(LowrankKernels::lowrank_ops PROPERTIES
    IMPORTED_LOCATION "${LowrankKernels_LIBRARY}"
    IMPORTED_SONAME "liblowrank_ops.so")
  # A program reaches the ops through the dispatcher (or an AOTInductor package), never through a
  # symbol of the library, so the linker must keep the library even where it drops unused ones
  # (--as-needed): its static registrations run when it is loaded.
  set_property(TARGET LowrankKernels::lowrank_ops PROPERTY INTERFACE_LINK_OPTIONS "LINKER:--no-as-needed")
endif()

set(LowrankKernels_FOUND TRUE)
unset(_lowrank_package_dir)
