# Make an INTERFACE target `torch_lite` from the torch of the build interpreter, without torch's own
# find_package(Torch) (it hard-fails for a CUDA torch without a toolkit, overrides
# CMAKE_CUDA_ARCHITECTURES and mislocates CUDA through the nvcc wrapper; see ../shared/BUILD.md).

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
  "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(torch.version.cuda or ''); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_info RESULT_VARIABLE _torch_rc ERROR_VARIABLE _torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE)

if(NOT _torch_rc EQUAL 0)
  # Isolated builds cannot import the user's torch: look for it on CMAKE_PREFIX_PATH / sys.path entries.
  set(_torch_dir "")
  foreach(_p IN LISTS CMAKE_PREFIX_PATH)
    if(EXISTS "${_p}/torch/include/torch/library.h")
      set(_torch_dir "${_p}/torch")
      break()
    endif()
  endforeach()
  if(NOT _torch_dir)
    message(FATAL_ERROR
      "twotower_ext: cannot import torch with ${Python_EXECUTABLE}:\n${_torch_err}\n"
      "Install torch first and build with `pip install --no-build-isolation .`")
  endif()
  file(READ "${_torch_dir}/version.py" _vpy)
  string(REGEX MATCH "__version__ = '([^']+)'" _m "${_vpy}")
  set(TORCH_VERSION "${CMAKE_MATCH_1}")
  string(REGEX MATCH "cuda: Optional\\[str\\] = '([^']+)'" _m "${_vpy}")
  set(TORCH_CUDA_VERSION "${CMAKE_MATCH_1}")
  set(TORCH_CXX11_ABI 1)
  set(TORCH_DIR "${_torch_dir}")
else()
  string(REPLACE "\n" ";" _torch_info "${_torch_info}")
  list(GET _torch_info 0 TORCH_DIR)
  list(GET _torch_info 1 TORCH_VERSION)
  list(GET _torch_info 2 TORCH_CUDA_VERSION)
  list(GET _torch_info 3 TORCH_CXX11_ABI)
endif()

message(STATUS "twotower_ext: torch ${TORCH_VERSION} at ${TORCH_DIR} (CUDA: '${TORCH_CUDA_VERSION}')")

add_library(torch_lite INTERFACE)
target_include_directories(torch_lite SYSTEM INTERFACE
  "${TORCH_DIR}/include" "${TORCH_DIR}/include/torch/csrc/api/include")
target_link_libraries(torch_lite INTERFACE
  "${TORCH_DIR}/lib/libtorch.so" "${TORCH_DIR}/lib/libtorch_cpu.so" "${TORCH_DIR}/lib/libc10.so")
target_compile_definitions(torch_lite INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})

function(torch_lite_add_cuda target)
  target_link_libraries(${target} INTERFACE
    "${TORCH_DIR}/lib/libtorch_cuda.so" "${TORCH_DIR}/lib/libc10_cuda.so")
endfunction()
