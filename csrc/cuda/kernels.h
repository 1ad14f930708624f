// The CUDA kernels (adamw.cu, norm.cu, elementwise.cu): raw pointers and a stream, CUDA runtime headers only, so
// they compile with nvcc on machines without a GPU or torch. binding.cpp launches them from torch.
#pragma once
#include <cuda_runtime.h>

#include "../kernel_args.h"

namespace engine_cuda {

using engine_kernels::AdamArgs;
using engine_kernels::DType;
using engine_kernels::ListArgs;

cudaError_t adamw(const AdamArgs& args, cudaStream_t stream);

// Bytes of device scratch that l2norm needs for these tensors (a double per tensor, a float per chunk).
int64_t l2norm_scratch_size(const ListArgs& args);
// per_tensor[i] = the L2 norm of tensor i, *total = that of all of them (device fp32; fp32 accumulation within a
// chunk, double across chunks and tensors, in a fixed order: the result does not depend on scheduling).
cudaError_t l2norm(const ListArgs& args, void* scratch, float* per_tensor, float* total, cudaStream_t stream);

// tensors *= scale (times *scale_ptr if set), in place.
cudaError_t scale(const ListArgs& args, float scale, const float* scale_ptr, cudaStream_t stream);

// elementwise.cu: the layer's elementwise work (RMSNorm, rotary embedding, SwiGLU), forward and backward.

// rows x cols contiguous tensors of one dtype (x and the weights of RMSNorm share it; cols <= kMaxNormCols).
struct RowsArgs {
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;
  DType dtype = DType::kFloat;
};
constexpr int64_t kMaxNormCols = 32768;  // RMSNorm backward keeps a float per column in shared memory
constexpr int64_t kNormPartials = 512;   // RMSNorm backward: weight-gradient partial sums (fixed: deterministic)

// y = weight * round(x * rstd), rstd[row] = 1 / sqrt(mean(x^2) + eps) (fp32).
cudaError_t rms_norm(const RowsArgs& a, const void* weight, float eps, void* y, float* rstd, cudaStream_t stream);
// The bytes of scratch the backward needs (its weight-gradient partial sums).
int64_t rms_norm_backward_scratch_size(int64_t rows, int64_t cols);
cudaError_t rms_norm_backward(const RowsArgs& a, const void* dy, const void* weight, const float* rstd, void* dx,
                              void* dweight, void* scratch, cudaStream_t stream);

// Rotary embedding of x [batch, heads, seq, dim] (element strides below; the last dimension contiguous) with
// tables cos, sin [seq, dim] (contiguous, x's dtype), into out; backward: the transposed rotation.
struct RopeArgs {
  int64_t batch = 0, heads = 0, seq = 0, dim = 0;
  int64_t in_stride[3] = {0, 0, 0}, out_stride[3] = {0, 0, 0};  // batch, head, position
  const void* x = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
  DType dtype = DType::kFloat;
  bool backward = false;
};
cudaError_t rope(const RopeArgs& a, cudaStream_t stream);

// y = silu(gate) * up over numel contiguous elements, and its backward.
cudaError_t swiglu(int64_t numel, DType dtype, const void* gate, const void* up, void* y, cudaStream_t stream);
cudaError_t swiglu_backward(int64_t numel, DType dtype, const void* dy, const void* gate, const void* up,
                            void* dgate, void* dup, cudaStream_t stream);

}  // namespace engine_cuda
