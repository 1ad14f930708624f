// The CUDA kernels (adamw.cu, norm.cu): raw pointers and a stream, CUDA runtime headers only, so they compile
// with nvcc on machines without a GPU or torch. binding.cpp launches them from torch.
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

}  // namespace engine_cuda
