// Arguments of the fused kernels, shared by the CPU kernels (cpu/), the CUDA kernels (cuda/) and the torch
// bindings. Plain C++: no torch and no CUDA headers. Pointer arrays live on the host; the pointers in them, and
// the optional scalar pointers, point into the memory of the kernels' device.
#pragma once
#include <cstdint>

namespace engine_kernels {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// One AdamW step over n tensors of one param dtype and one grad dtype; states (and masters) are fp32.
struct AdamArgs {
  int64_t n = 0;
  const int64_t* numels = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  float* const* exp_avgs = nullptr;
  float* const* exp_avg_sqs = nullptr;
  float* const* masters = nullptr;  // null: no fp32 master weights, the params themselves are updated
  DType param_dtype = DType::kFloat, grad_dtype = DType::kFloat;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  int64_t step = 1;                  // the step being taken (1-based), for bias correction
  bool adam_w_mode = true;           // true: decoupled weight decay (AdamW); false: L2 added to the gradient
  float grad_scale = 1.0f;           // gradients are multiplied by grad_scale (times *grad_scale_ptr if set)
  const float* grad_scale_ptr = nullptr;
  const float* found_inf = nullptr;  // if set and nonzero, the step is skipped
};

// n tensors of one dtype (the L2 norm and the in-place scale).
struct ListArgs {
  int64_t n = 0;
  const int64_t* numels = nullptr;
  void* const* tensors = nullptr;
  DType dtype = DType::kFloat;
};

}  // namespace engine_kernels
