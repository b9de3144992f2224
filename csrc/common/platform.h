// Torch-free helpers shared by the CPU and CUDA kernels: host/device qualifiers, dtype tags, status codes.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TT_HOST_DEVICE inline
#endif

namespace tt {

// Element types the kernels accept; the binding layer maps torch dtypes onto these.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Kernels and launchers return a Status; the binding layer turns anything but kOk into a torch error.
enum class Status : int32_t {
  kOk = 0,
  kUnsupportedDType = 1,
  kUnsupportedShape = 2,
  kLaunchFailed = 3,
};

inline const char* status_str(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kUnsupportedDType: return "unsupported dtype";
    case Status::kUnsupportedShape: return "unsupported shape";
    case Status::kLaunchFailed: return "CUDA launch failed";
  }
  return "unknown status";
}

}  // namespace tt
