// Fused multi-tensor AdamW / Adam (L2) step: one pass reads param (or fp32 master), grad, exp_avg, exp_avg_sq
// and writes them back, the gradient scale (loss-scale unscale x clip coefficient) applied on the fly.
#include <cmath>

#include "multi_tensor.cuh"

namespace engine_cuda {
namespace {

struct AdamConsts {
  float beta1c, beta2, beta2c, eps, bc2_sqrt, neg_step_size, decay, l2, grad_scale;
  bool adam_w_mode;
  const float* grad_scale_ptr;
  const float* found_inf;
};

// The same sequence of operations as torch.optim.AdamW / Adam and the CPU kernels.
__device__ __forceinline__ void update(const AdamConsts& c, float& w, float g, float& m, float& v) {
  if (c.adam_w_mode) {
    w = w * c.decay;
  } else {
    g = g + w * c.l2;
  }
  m = m + (g - m) * c.beta1c;
  v = v * c.beta2 + g * g * c.beta2c;
  const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
  w = w + c.neg_step_size * (m / denom);
}

// Operands: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 fp32 master (with kMaster).
template <typename P, typename G, bool kMaster>
struct AdamOp {
  AdamConsts c;

  __device__ void operator()(const TensorMeta<5>& meta, int slot, int64_t start, int n) const {
    if (c.found_inf != nullptr && *c.found_inf != 0.0f) return;
    const float scale = c.grad_scale * (c.grad_scale_ptr != nullptr ? *c.grad_scale_ptr : 1.0f);
    P* p = static_cast<P*>(meta.ptr[0][slot]) + start;
    const G* g = static_cast<const G*>(meta.ptr[1][slot]) + start;
    float* m = static_cast<float*>(meta.ptr[2][slot]) + start;
    float* v = static_cast<float*>(meta.ptr[3][slot]) + start;
    float* w = kMaster ? static_cast<float*>(meta.ptr[4][slot]) + start : nullptr;
    const bool aligned = is_aligned(p) && is_aligned(g) && is_aligned(m) && is_aligned(v) && (!kMaster || is_aligned(w));
    for (int i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
      float rw[kILP], rg[kILP], rm[kILP], rv[kILP];
      if (kMaster) {
        load(rw, w, i, n, aligned);
      } else {
        load(rw, p, i, n, aligned);
      }
      load(rg, g, i, n, aligned);
      load(rm, m, i, n, aligned);
      load(rv, v, i, n, aligned);
#pragma unroll
      for (int k = 0; k < kILP; ++k) update(c, rw[k], __fmul_rn(rg[k], scale), rm[k], rv[k]);  // rounded, as if pre-scaled
      store(m, rm, i, n, aligned);
      store(v, rv, i, n, aligned);
      if (kMaster) store(w, rw, i, n, aligned);
      store(p, rw, i, n, aligned);
    }
  }
};

AdamConsts make_consts(const AdamArgs& a) {
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  return {static_cast<float>(1.0 - a.beta1),
          static_cast<float>(a.beta2),
          static_cast<float>(1.0 - a.beta2),
          static_cast<float>(a.eps),
          static_cast<float>(std::sqrt(bc2)),
          static_cast<float>(-(a.lr / bc1)),
          static_cast<float>(1.0 - a.lr * a.weight_decay),
          static_cast<float>(a.weight_decay),
          a.grad_scale,
          a.adam_w_mode,
          a.grad_scale_ptr,
          a.found_inf};
}

}  // namespace

cudaError_t adamw(const AdamArgs& a, cudaStream_t stream) {
  void* const* const ptrs[5] = {a.params, const_cast<void* const*>(a.grads),
                                reinterpret_cast<void* const*>(a.exp_avgs),
                                reinterpret_cast<void* const*>(a.exp_avg_sqs),
                                a.masters ? reinterpret_cast<void* const*>(a.masters)
                                          : reinterpret_cast<void* const*>(a.exp_avgs)};  // unused slot
  const AdamConsts c = make_consts(a);
  return with_dtype(a.param_dtype, [&](auto p) {
    return with_dtype(a.grad_dtype, [&](auto g) {
      using P = decltype(p);
      using G = decltype(g);
      return a.masters ? multi_tensor_apply(a.n, a.numels, ptrs, AdamOp<P, G, true>{c}, stream)
                       : multi_tensor_apply(a.n, a.numels, ptrs, AdamOp<P, G, false>{c}, stream);
    });
  });
}

}  // namespace engine_cuda
