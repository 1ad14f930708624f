// Torch binding of the CUDA kernels: checks the tensor lists, then launches the kernels of adamw.cu / norm.cu on
// the current stream of the tensors' device.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../binding_common.h"
#include "kernels.h"

namespace {

using engine_binding::OptTensor;
using engine_binding::Tensors;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

c10::Device cuda_device(const Tensors& ts, const char* what) {
  TORCH_CHECK(ts[0].is_cuda(), what, ": the CUDA kernels got tensors on ", ts[0].device());
  return ts[0].device();
}

void adamw_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
            const Tensors& masters, double lr, double beta1, double beta2, double eps, double weight_decay,
            int64_t step, bool adam_w_mode, double grad_scale, const OptTensor& grad_scale_tensor,
            const OptTensor& found_inf) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(cuda_device(params, "adamw_"));
  engine_binding::AdamCall call(params, grads, exp_avgs, exp_avg_sqs, masters, grad_scale_tensor, found_inf);
  call.set_hyper(lr, beta1, beta2, eps, weight_decay, step, adam_w_mode, grad_scale);
  check(engine_cuda::adamw(call.args, c10::cuda::getCurrentCUDAStream()), "adamw_");
}

std::tuple<at::Tensor, at::Tensor> l2norm(const Tensors& tensors) {
  if (tensors.empty()) return {at::zeros({}, at::kFloat), at::zeros({0}, at::kFloat)};
  const auto device = cuda_device(tensors, "l2norm");
  const c10::cuda::CUDAGuard guard(device);
  const engine_binding::List l(tensors, "l2norm", device);
  const auto args = l.args();
  const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);
  auto scratch = at::empty({engine_cuda::l2norm_scratch_size(args)}, f32.dtype(at::kByte));
  auto per_tensor = at::empty({l.size()}, f32);
  auto total = at::empty({}, f32);
  check(engine_cuda::l2norm(args, scratch.data_ptr(), per_tensor.data_ptr<float>(), total.data_ptr<float>(),
                            c10::cuda::getCurrentCUDAStream()),
        "l2norm");
  return {total, per_tensor};
}

void scale_(const Tensors& tensors, double scale, const OptTensor& scale_tensor) {
  if (tensors.empty()) return;
  const auto device = cuda_device(tensors, "scale_");
  const c10::cuda::CUDAGuard guard(device);
  const engine_binding::List l(tensors, "scale_", device);
  check(engine_cuda::scale(l.args(), static_cast<float>(scale),
                           engine_binding::scalar_ptr(scale_tensor, device, "scale_tensor"),
                           c10::cuda::getCurrentCUDAStream()),
        "scale_");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { engine_binding::define_ops(m, adamw_, l2norm, scale_); }
