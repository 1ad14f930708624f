// Torch binding of the CPU kernels: checks the tensor lists and hands raw pointers to kernels.cpp.
#include <cmath>

#include "../binding_common.h"
#include "kernels.h"

namespace {

using engine_binding::Tensors;
using engine_cpu::DType;

const c10::Device kCPU(c10::kCPU);

void adamw_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
            const Tensors& masters, double lr, double beta1, double beta2, double eps, double weight_decay,
            int64_t step, bool adam_w_mode, double grad_scale, const std::optional<at::Tensor>& grad_scale_tensor,
            const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "adamw_: this is the CPU extension; params are on ",
              params[0].device());
  auto l = engine_binding::unpack_adam(params, grads, exp_avgs, exp_avg_sqs, masters);
  const float* scale = engine_binding::scalar_ptr(grad_scale_tensor, kCPU, "grad_scale_tensor");
  engine_cpu::AdamArgs a{};
  a.n = l.params.size();
  a.numels = l.params.numels.data();
  a.params = l.params.ptrs.data();
  a.grads = l.grads.ptrs.data();
  a.exp_avgs = reinterpret_cast<float* const*>(l.exp_avgs.ptrs.data());
  a.exp_avg_sqs = reinterpret_cast<float* const*>(l.exp_avg_sqs.ptrs.data());
  a.masters = masters.empty() ? nullptr : reinterpret_cast<float* const*>(l.masters.ptrs.data());
  a.param_dtype = static_cast<DType>(l.params.dtype);
  a.grad_dtype = static_cast<DType>(l.grads.dtype);
  a.lr = lr, a.beta1 = beta1, a.beta2 = beta2, a.eps = eps, a.weight_decay = weight_decay;
  a.step = step;
  a.adam_w_mode = adam_w_mode;
  a.grad_scale = static_cast<float>(grad_scale * (scale ? *scale : 1.0f));
  a.found_inf = engine_binding::scalar_ptr(found_inf, kCPU, "found_inf");
  engine_cpu::adamw(a);
}

std::tuple<at::Tensor, at::Tensor> l2norm(const Tensors& tensors) {
  const auto l = engine_binding::unpack(tensors, "l2norm", kCPU);
  std::vector<double> sumsq(l.size());
  engine_cpu::sumsq({l.size(), l.numels.data(), l.ptrs.data(), static_cast<DType>(l.dtype), sumsq.data()});
  auto per_tensor = at::empty({l.size()}, at::kFloat);
  double total = 0.0;
  for (int64_t i = 0; i < l.size(); ++i) {
    total += sumsq[i];
    per_tensor.data_ptr<float>()[i] = static_cast<float>(std::sqrt(sumsq[i]));
  }
  return {at::scalar_tensor(static_cast<float>(std::sqrt(total)), at::kFloat), per_tensor};
}

void scale_(const Tensors& tensors, double scale, const std::optional<at::Tensor>& scale_tensor) {
  const auto l = engine_binding::unpack(tensors, "scale_", kCPU);
  const float* s = engine_binding::scalar_ptr(scale_tensor, kCPU, "scale_tensor");
  engine_cpu::scale({l.size(), l.numels.data(), l.ptrs.data(), static_cast<DType>(l.dtype),
                   static_cast<float>(scale * (s ? *s : 1.0f))});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  engine_binding::define_ops(m, adamw_, l2norm, scale_);
  m.def("isa", [] { return std::string(engine_cpu::isa()); }, "The instruction set the kernels were built for.");
}
