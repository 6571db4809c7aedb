// Checked CUDA / cuBLAS calls: a failure throws longtune::CudaError naming the call (stringified),
// the source location and the library's message.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "src/common/error.hpp"

namespace longtune::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line);

// Number of visible CUDA devices; 0 (not an error) when there is no driver or no GPU.
int device_count();

}  // namespace longtune::cuda

#define CUDA_CHECK(call)                                                                     \
  do {                                                                                       \
    const cudaError_t lt_err_ = (call);                                                      \
    if (lt_err_ != cudaSuccess) ::longtune::cuda::throw_cuda_error(lt_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(call)                                                                   \
  do {                                                                                       \
    const cublasStatus_t lt_st_ = (call);                                                    \
    if (lt_st_ != CUBLAS_STATUS_SUCCESS) ::longtune::cuda::throw_cublas_error(lt_st_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
