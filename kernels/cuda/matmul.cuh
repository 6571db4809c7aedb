// Linear layers through cuBLASLt: storage-type inputs, fp32 accumulation; twin of
// kernels/cpu/matmul.hpp (nn.Linear without bias: out = inp @ weight^T).
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// A cuBLASLt handle and its workspace, one per stream that runs matmuls.
class Blas {
 public:
  explicit Blas(size_t workspace_bytes = size_t(32) << 20);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  cublasLtHandle_t handle() const { return handle_; }
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }

 private:
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

struct MatmulOptions {
  int64_t ld_out = 0;                 // row stride of out (0 = OC): write into a column slice of a wider buffer
  const void* residual = nullptr;     // forward: out = inp @ weight^T + residual (same type and layout as out)
  bool accumulate_dinp = false;       // backward: dinp += instead of =
};

// out (T, OC) = inp (T, C) @ weight (OC, C)^T [+ residual]
template <typename scalar_t>
void matmul_forward(scalar_t* out, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, int64_t OC,
                    const Blas& blas, cudaStream_t stream, const MatmulOptions& opt = {});
// dinp (T, C) = dout @ weight (assigned, or += with accumulate_dinp; skipped when null)
// dweight (OC, C) += dout^T @ inp in fp32 (skipped when null).
// dout (T, OC) has row stride opt.ld_out (0 = OC).
template <typename scalar_t>
void matmul_backward(scalar_t* dinp, float* dweight, const scalar_t* dout, const scalar_t* inp,
                     const scalar_t* weight, int64_t T, int64_t C, int64_t OC, const Blas& blas,
                     cudaStream_t stream, const MatmulOptions& opt = {});

}  // namespace longtune::cuda
