// Torch binding of the CPU kernels: checks the tensor lists and hands raw pointers to kernels.cpp.
#include <cmath>

#include "../binding_common.h"
#include "kernels.h"

namespace {

using engine_binding::OptTensor;
using engine_binding::Tensors;

const c10::Device kCPU(c10::kCPU);

void adamw_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
            const Tensors& masters, double lr, double beta1, double beta2, double eps, double weight_decay,
            int64_t step, bool adam_w_mode, double grad_scale, const OptTensor& grad_scale_tensor,
            const OptTensor& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cpu(), "adamw_: the CPU kernels got tensors on ", params[0].device());
  engine_binding::AdamCall call(params, grads, exp_avgs, exp_avg_sqs, masters, grad_scale_tensor, found_inf);
  call.set_hyper(lr, beta1, beta2, eps, weight_decay, step, adam_w_mode, grad_scale);
  engine_cpu::adamw(call.args);
}

std::tuple<at::Tensor, at::Tensor> l2norm(const Tensors& tensors) {
  const engine_binding::List l(tensors, "l2norm", kCPU);
  std::vector<double> sumsq(l.size());
  engine_cpu::sumsq(l.args(), sumsq.data());
  auto per_tensor = at::empty({l.size()}, at::kFloat);
  double total = 0.0;
  for (int64_t i = 0; i < l.size(); ++i) {
    total += sumsq[i];
    per_tensor.data_ptr<float>()[i] = static_cast<float>(std::sqrt(sumsq[i]));
  }
  return {at::scalar_tensor(std::sqrt(total), at::kFloat), per_tensor};
}

void scale_(const Tensors& tensors, double scale, const OptTensor& scale_tensor) {
  const engine_binding::List l(tensors, "scale_", kCPU);
  engine_cpu::scale(l.args(), static_cast<float>(scale), engine_binding::scalar_ptr(scale_tensor, kCPU, "scale_tensor"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  engine_binding::define_ops(m, adamw_, l2norm, scale_);
  m.def("isa", [] { return std::string(engine_cpu::isa()); }, "The instruction set the kernels were built for.");
}
