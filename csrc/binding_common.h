// What the CPU and CUDA torch bindings share: checking and unpacking tensor lists into raw pointers, and the
// Python signatures of the three ops (cpu/binding.cpp and cuda/binding.cpp supply the implementations).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace engine_binding {

// dtype codes shared with the kernels: 0 fp32, 1 bf16, 2 fp16.
inline int dtype_code(at::ScalarType s, const char* what) {
  switch (s) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", s, " (the kernels take fp32, bf16 and fp16)");
  }
}

struct List {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  int dtype = 0;
  int64_t size() const { return static_cast<int64_t>(ptrs.size()); }
};

// Raw pointers of contiguous tensors of one dtype on `device`; `fp32_only` for optimizer states and masters.
inline List unpack(const std::vector<at::Tensor>& ts, const char* what, const c10::Device& device,
                   bool fp32_only = false) {
  List l;
  for (const auto& t : ts) {
    TORCH_CHECK(t.device() == device, what, ": expected tensors on ", device, ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
    TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), what, ": all tensors must have one dtype");
    TORCH_CHECK(!fp32_only || t.scalar_type() == at::kFloat, what, ": tensors must be fp32");
    l.ptrs.push_back(t.data_ptr());
    l.numels.push_back(t.numel());
  }
  l.dtype = ts.empty() ? 0 : dtype_code(ts[0].scalar_type(), what);
  return l;
}

inline void check_matches(const List& a, const List& b, const char* what) {
  TORCH_CHECK(a.numels == b.numels, what, ": the lists must hold tensors of the same sizes as params");
}

struct AdamLists {
  List params, grads, exp_avgs, exp_avg_sqs, masters;
};

inline AdamLists unpack_adam(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                             const std::vector<at::Tensor>& masters) {
  const auto device = params.empty() ? c10::Device(c10::kCPU) : params[0].device();
  AdamLists l{unpack(params, "params", device), unpack(grads, "grads", device),
              unpack(exp_avgs, "exp_avgs", device, true), unpack(exp_avg_sqs, "exp_avg_sqs", device, true),
              unpack(masters, "masters", device, true)};
  check_matches(l.params, l.grads, "grads");
  check_matches(l.params, l.exp_avgs, "exp_avgs");
  check_matches(l.params, l.exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(masters.empty() || l.masters.numels == l.params.numels,
              "masters: pass none, or one fp32 tensor per param");
  return l;
}

// A one-element fp32 tensor (a scale or a found-inf flag) on `device`, or null.
inline const float* scalar_ptr(const std::optional<at::Tensor>& t, const c10::Device& device, const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, what,
              ": expected a one-element fp32 tensor on ", device);
  return t->data_ptr<float>();
}

using Tensors = std::vector<at::Tensor>;
using AdamFn = void (*)(const Tensors&, const Tensors&, const Tensors&, const Tensors&, const Tensors&, double,
                        double, double, double, double, int64_t, bool, double, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&);
using NormFn = std::tuple<at::Tensor, at::Tensor> (*)(const Tensors&);
using ScaleFn = void (*)(const Tensors&, double, const std::optional<at::Tensor>&);

inline void define_ops(pybind11::module& m, AdamFn adamw, NormFn l2norm, ScaleFn scale) {
  namespace py = pybind11;
  m.def("adamw_", adamw,
        "One AdamW (adam_w_mode) or Adam-with-L2 step over lists of tensors, in place. grads are multiplied "
        "by grad_scale (times grad_scale_tensor when given); a nonzero found_inf skips the step; with masters "
        "the fp32 masters are updated and the params receive their rounding.",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("masters"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("step"), py::arg("adam_w_mode"), py::arg("grad_scale"), py::arg("grad_scale_tensor"),
        py::arg("found_inf"));
  m.def("l2norm", l2norm,
        "(total, per_tensor): the L2 norm of all the tensors together (0-dim fp32) and of each ([n] fp32).",
        py::arg("tensors"));
  m.def("scale_", scale, "tensors *= scale (times scale_tensor when given), in place.", py::arg("tensors"),
        py::arg("scale"), py::arg("scale_tensor"));
}

}  // namespace engine_binding
