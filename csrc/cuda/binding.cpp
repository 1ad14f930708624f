// Torch binding of the CUDA kernels: checks the tensors, then launches the kernels of adamw.cu, norm.cu and
// elementwise.cu on the current stream of the tensors' device.
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

// ---------------------------------------------------------------------------------------------------------
// The elementwise kernels (elementwise.cu).

// Checks that the tensors are CUDA tensors of one supported dtype on one device; returns the device.
c10::Device same_cuda(std::initializer_list<const at::Tensor*> ts, const char* what) {
  const at::Tensor& first = **ts.begin();
  TORCH_CHECK(first.is_cuda(), what, ": the CUDA kernels got a tensor on ", first.device());
  engine_binding::dtype_of(first.scalar_type(), what);
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->device() == first.device(), what, ": expected tensors on ", first.device(), ", got one on ",
                t->device());
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), what, ": all tensors must have one dtype, got ",
                first.scalar_type(), " and ", t->scalar_type());
  }
  return first.device();
}

void check_contiguous(std::initializer_list<const at::Tensor*> ts, const char* what) {
  for (const at::Tensor* t : ts) TORCH_CHECK(t->is_contiguous(), what, ": tensors must be contiguous");
}

engine_cuda::RowsArgs norm_rows(const at::Tensor& x, const at::Tensor& weight, const char* what) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), what,
              ": weight must be 1-D of x's last size");
  // the backward keeps a float per feature in shared memory (plus a little of its own)
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()), what);
  const int64_t most = std::min<int64_t>(engine_cuda::kMaxNormCols, (optin - 1024) / 4);
  TORCH_CHECK(x.size(-1) <= most, what, ": at most ", most, " features per row on this GPU (", optin,
              " bytes of shared memory per block), got ", x.size(-1), "; leave out --fused-elementwise");
  engine_cuda::RowsArgs a;
  a.cols = x.size(-1);
  a.rows = a.cols == 0 ? 0 : x.numel() / a.cols;
  a.x = x.data_ptr();
  a.dtype = engine_binding::dtype_of(x.scalar_type(), what);
  return a;
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(same_cuda({&x, &weight}, "rms_norm"));
  check_contiguous({&x, &weight}, "rms_norm");
  const auto a = norm_rows(x, weight, "rms_norm");
  auto y = at::empty_like(x);
  auto rstd = at::empty({a.rows}, x.options().dtype(at::kFloat));
  check(engine_cuda::rms_norm(a, weight.data_ptr(), static_cast<float>(eps), y.data_ptr(), rstd.data_ptr<float>(),
                              c10::cuda::getCurrentCUDAStream()),
        "rms_norm");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(same_cuda({&dy, &x, &weight}, "rms_norm_backward"));
  check_contiguous({&dy, &x, &weight, &rstd}, "rms_norm_backward");
  const auto a = norm_rows(x, weight, "rms_norm_backward");
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.scalar_type() == at::kFloat && rstd.numel() == a.rows &&
                  rstd.device() == x.device(),
              "rms_norm_backward: dy must match x, rstd must be fp32 with one value per row");
  auto dx = at::empty_like(x);
  auto dweight = a.rows == 0 ? at::zeros_like(weight) : at::empty_like(weight);
  auto scratch = at::empty({engine_cuda::rms_norm_backward_scratch_size(a.rows, a.cols)},
                           x.options().dtype(at::kByte));
  check(engine_cuda::rms_norm_backward(a, dy.data_ptr(), weight.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                       dweight.data_ptr(), scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "rms_norm_backward");
  return {dx, dweight};
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const c10::cuda::CUDAGuard guard(same_cuda({&x, &cos, &sin}, "rope"));
  check_contiguous({&cos, &sin}, "rope");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rope: x must be [batch, heads, seq, dim] ",
              "with an even, contiguous last dimension");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(2) && cos.size(1) == x.size(3),
              "rope: cos and sin must be [seq, dim] tables of x's positions");
  auto out = at::empty_like(x);  // x's layout (dense here: its last dimension is contiguous)
  TORCH_CHECK(out.stride(3) == 1, "rope: x's layout is not dense");
  engine_cuda::RopeArgs a;
  a.batch = x.size(0), a.heads = x.size(1), a.seq = x.size(2), a.dim = x.size(3);
  for (int d = 0; d < 3; ++d) a.in_stride[d] = x.stride(d), a.out_stride[d] = out.stride(d);
  a.x = x.data_ptr(), a.cos = cos.data_ptr(), a.sin = sin.data_ptr(), a.out = out.data_ptr();
  a.dtype = engine_binding::dtype_of(x.scalar_type(), "rope");
  a.backward = backward;
  check(engine_cuda::rope(a, c10::cuda::getCurrentCUDAStream()), "rope");
  return out;
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::CUDAGuard guard(same_cuda({&gate, &up}, "swiglu"));
  check_contiguous({&gate, &up}, "swiglu");
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: gate and up must have one shape");
  auto y = at::empty_like(gate);
  check(engine_cuda::swiglu(gate.numel(), engine_binding::dtype_of(gate.scalar_type(), "swiglu"), gate.data_ptr(),
                            up.data_ptr(), y.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "swiglu");
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dy, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  const c10::cuda::CUDAGuard guard(same_cuda({&dy, &gate, &up}, "swiglu_backward"));
  check_contiguous({&dy, &gate, &up}, "swiglu_backward");
  TORCH_CHECK(dy.sizes() == gate.sizes() && up.sizes() == gate.sizes(),
              "swiglu_backward: dy, gate and up must have one shape");
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  check(engine_cuda::swiglu_backward(gate.numel(), engine_binding::dtype_of(gate.scalar_type(), "swiglu_backward"),
                                     dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
                                     c10::cuda::getCurrentCUDAStream()),
        "swiglu_backward");
  return {dgate, dup};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  engine_binding::define_ops(m, adamw_, l2norm, scale_);
  m.def("rms_norm", rms_norm, "(y, rstd): RMSNorm over the last dimension; rstd fp32, one per row.", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_backward", rms_norm_backward, "(dx, dweight) of rms_norm.", py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("rstd"));
  m.def("rope", rope, "Rotary embedding of x [b, heads, s, d] (backward: the transposed rotation).", py::arg("x"),
        py::arg("cos"), py::arg("sin"), py::arg("backward"));
  m.def("swiglu", swiglu, "silu(gate) * up.", py::arg("gate"), py::arg("up"));
  m.def("swiglu_backward", swiglu_backward, "(dgate, dup) of swiglu.", py::arg("dy"), py::arg("gate"),
        py::arg("up"));
}
