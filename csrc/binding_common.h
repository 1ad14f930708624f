// What the CPU and CUDA torch bindings share: checking tensor lists and unpacking them into the kernels'
// arguments (kernel_args.h), and the Python signatures of the three ops.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernel_args.h"

namespace engine_binding {

using engine_kernels::DType;
using Tensors = std::vector<at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

inline DType dtype_of(at::ScalarType s, const char* what) {
  switch (s) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", s, " (the kernels take fp32, bf16 and fp16)");
  }
}

// Pointers and sizes of contiguous tensors of one dtype on `device`.
struct List {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  DType dtype = DType::kFloat;

  List(const Tensors& ts, const char* what, const c10::Device& device, bool fp32_only = false) {
    for (const auto& t : ts) {
      TORCH_CHECK(t.device() == device, what, ": expected tensors on ", device, ", got one on ", t.device());
      TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
      TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), what, ": all tensors must have one dtype");
      TORCH_CHECK(!fp32_only || t.scalar_type() == at::kFloat, what, ": tensors must be fp32");
      ptrs.push_back(t.data_ptr());
      numels.push_back(t.numel());
    }
    if (!ts.empty()) dtype = dtype_of(ts[0].scalar_type(), what);
  }
  int64_t size() const { return static_cast<int64_t>(ptrs.size()); }
  engine_kernels::ListArgs args() const { return {size(), numels.data(), ptrs.data(), dtype}; }
};

// A one-element fp32 tensor (a scale or a found-inf flag) on `device`, or null.
inline const float* scalar_ptr(const OptTensor& t, const c10::Device& device, const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, what,
              ": expected a one-element fp32 tensor on ", device);
  return t->data_ptr<float>();
}

// The checked arguments of one adamw_ call; `args` points into the lists, so an AdamCall is never copied.
struct AdamCall {
  c10::Device device;
  List params, grads, exp_avgs, exp_avg_sqs, masters;
  engine_kernels::AdamArgs args;

  AdamCall(const Tensors& p, const Tensors& g, const Tensors& m, const Tensors& v, const Tensors& w,
           const OptTensor& grad_scale_tensor, const OptTensor& found_inf)
      : device(p.empty() ? c10::Device(c10::kCPU) : p[0].device()),
        params(p, "params", device),
        grads(g, "grads", device),
        exp_avgs(m, "exp_avgs", device, true),
        exp_avg_sqs(v, "exp_avg_sqs", device, true),
        masters(w, "masters", device, true) {
    TORCH_CHECK(grads.numels == params.numels && exp_avgs.numels == params.numels &&
                    exp_avg_sqs.numels == params.numels,
                "adamw_: grads, exp_avgs and exp_avg_sqs must match params one to one in size");
    TORCH_CHECK(w.empty() || masters.numels == params.numels, "adamw_: pass no masters, or one per param");
    args.n = params.size();
    args.numels = params.numels.data();
    args.params = params.ptrs.data();
    args.grads = grads.ptrs.data();
    args.exp_avgs = reinterpret_cast<float* const*>(exp_avgs.ptrs.data());
    args.exp_avg_sqs = reinterpret_cast<float* const*>(exp_avg_sqs.ptrs.data());
    args.masters = w.empty() ? nullptr : reinterpret_cast<float* const*>(masters.ptrs.data());
    args.param_dtype = params.dtype;
    args.grad_dtype = grads.dtype;
    args.grad_scale_ptr = scalar_ptr(grad_scale_tensor, device, "grad_scale_tensor");
    args.found_inf = scalar_ptr(found_inf, device, "found_inf");
  }
  AdamCall(const AdamCall&) = delete;
  AdamCall& operator=(const AdamCall&) = delete;

  void set_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                 bool adam_w_mode, double grad_scale) {
    TORCH_CHECK(step >= 1, "adamw_: step counts from 1");
    args.lr = lr, args.beta1 = beta1, args.beta2 = beta2, args.eps = eps, args.weight_decay = weight_decay;
    args.step = step;
    args.adam_w_mode = adam_w_mode;
    args.grad_scale = static_cast<float>(grad_scale);
  }
};

using AdamFn = void (*)(const Tensors&, const Tensors&, const Tensors&, const Tensors&, const Tensors&, double,
                        double, double, double, double, int64_t, bool, double, const OptTensor&, const OptTensor&);
using NormFn = std::tuple<at::Tensor, at::Tensor> (*)(const Tensors&);
using ScaleFn = void (*)(const Tensors&, double, const OptTensor&);

// The ops release the GIL while they run (they touch no Python objects).
inline void define_ops(pybind11::module& m, AdamFn adamw, NormFn l2norm, ScaleFn scale) {
  namespace py = pybind11;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("adamw_", adamw, no_gil,
        "One AdamW (adam_w_mode) or Adam-with-L2 step over lists of tensors, in place. Gradients are multiplied "
        "by grad_scale (times grad_scale_tensor if given); a nonzero found_inf skips the step; with masters the "
        "fp32 masters are updated and the params receive their rounding.",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("masters"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("step"), py::arg("adam_w_mode"), py::arg("grad_scale"), py::arg("grad_scale_tensor"),
        py::arg("found_inf"));
  m.def("l2norm", l2norm, no_gil,
        "(total, per_tensor): the L2 norm of all the tensors together (0-dim fp32) and of each ([n] fp32).",
        py::arg("tensors"));
  m.def("scale_", scale, no_gil, "tensors *= scale (times scale_tensor if given), in place.", py::arg("tensors"),
        py::arg("scale"), py::arg("scale_tensor"));
}

}  // namespace engine_binding
