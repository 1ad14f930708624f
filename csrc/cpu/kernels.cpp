// The CPU kernels, written against at::vec::Vectorized: the build passes ATen's CPU_CAPABILITY macros and the
// matching -m flags (AVX512 / AVX2 / DEFAULT), so Vectorized<float> is a 16- or 8-lane register.
//
// Work is split into chunks of kChunk elements of one tensor; at::parallel_for spreads the chunks over the
// threads. Every element is computed the same way whatever the thread count, and the norm's partial sums are
// added in chunk order, so results are deterministic.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace engine_cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
using c10::BFloat16;
using c10::Half;

// Elements per step: one Vectorized<BFloat16/Half> converts to two float vectors.
constexpr int64_t kWidth = 2 * Vec::size();
constexpr int64_t kChunk = 1 << 15;  // elements per parallel task (a multiple of kWidth)
constexpr int64_t kBlock = 1 << 10;  // norm: fp32 partial sums are moved into a double every kBlock elements

template <typename T>
inline void load(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  } else {
    at::vec::load_to_float(p, a, b);
  }
}

template <typename T>
inline void store(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

template <typename F>
void with_dtype(DType d, const F& f) {
  switch (d) {
    case DType::kFloat: return f(float{});
    case DType::kBFloat16: return f(BFloat16{});
    case DType::kHalf: return f(Half{});
  }
}

struct Chunk {
  int64_t tensor, begin, size;
};

std::vector<Chunk> make_chunks(int64_t n, const int64_t* numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < numels[t]; b += kChunk) chunks.push_back({t, b, std::min(kChunk, numels[t] - b)});
  return chunks;
}

// Calls f(chunk, index) for every chunk: in parallel, unless all of them hold less than one chunk's worth of
// elements (then a parallel region would cost more than the work, as with ATen's GRAIN_SIZE).
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  const auto n = static_cast<int64_t>(chunks.size());
  int64_t total = 0;
  for (const auto& c : chunks) total += c.size;
  at::parallel_for(0, n, total < kChunk ? n : 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(chunks[i], i);
  });
}

// Runs step(ptrs + i...) over `size` elements, i advancing by kWidth. The ragged end is copied into zero-padded
// local buffers, stepped once and copied back, so it takes exactly the same arithmetic as the rest.
template <typename Step, typename... T>
void run(int64_t size, const Step& step, T*... ptrs) {
  int64_t i = 0;
  for (; i + kWidth <= size; i += kWidth) step((ptrs + i)...);
  const int64_t rest = size - i;
  if (rest == 0) return;
  auto pad = [&](auto* p) {
    std::array<std::remove_const_t<std::remove_pointer_t<decltype(p)>>, kWidth> buf{};
    std::copy_n(p + i, rest, buf.begin());
    return buf;
  };
  auto bufs = std::make_tuple(pad(ptrs)...);
  std::apply([&](auto&... b) { step(b.data()...); }, bufs);
  std::apply([&](auto&... b) {
    auto back = [&](const auto& buf, auto* p) {
      if constexpr (!std::is_const_v<std::remove_pointer_t<decltype(p)>>) std::copy_n(buf.begin(), rest, p + i);
    };
    (back(b, ptrs), ...);
  }, bufs);
}

struct AdamConsts {
  Vec beta1c, beta2, beta2c, eps, bc2_sqrt, neg_step_size, decay, l2, scale;
  bool adam_w_mode;

  explicit AdamConsts(const AdamArgs& a) {
    const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
    const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
    beta1c = Vec(static_cast<float>(1.0 - a.beta1));
    beta2 = Vec(static_cast<float>(a.beta2));
    beta2c = Vec(static_cast<float>(1.0 - a.beta2));
    eps = Vec(static_cast<float>(a.eps));
    bc2_sqrt = Vec(static_cast<float>(std::sqrt(bc2)));
    neg_step_size = Vec(static_cast<float>(-(a.lr / bc1)));
    decay = Vec(static_cast<float>(1.0 - a.lr * a.weight_decay));
    l2 = Vec(static_cast<float>(a.weight_decay));
    scale = Vec(a.grad_scale * (a.grad_scale_ptr ? *a.grad_scale_ptr : 1.0f));
    adam_w_mode = a.adam_w_mode;
  }

  // The same sequence of operations as torch.optim.AdamW / Adam (single-tensor and foreach paths).
  inline void update(Vec& w, Vec g, Vec& m, Vec& v) const {
    g = g * scale;
    if (adam_w_mode) {
      w = w * decay;
    } else {
      g = g + w * l2;
    }
    m = m + (g - m) * beta1c;
    v = v * beta2 + g * g * beta2c;
    const Vec denom = v.sqrt() / bc2_sqrt + eps;
    w = w + neg_step_size * (m / denom);
  }
};

// One step over kWidth elements. With master weights the fp32 master is the value updated and the param
// receives its rounding; without, the param itself is read, updated and stored.
template <typename P, typename G, bool kMaster>
struct AdamStep {
  const AdamConsts& c;
  void operator()(P* p, const G* g, float* m, float* v, float* w = nullptr) const {
    Vec w0, w1, g0, g1, m0, m1, v0, v1;
    if constexpr (kMaster) load(w, w0, w1); else load(p, w0, w1);
    load(g, g0, g1);
    load(m, m0, m1);
    load(v, v0, v1);
    c.update(w0, g0, m0, v0);
    c.update(w1, g1, m1, v1);
    store(m, m0, m1);
    store(v, v0, v1);
    if constexpr (kMaster) store(w, w0, w1);
    store(p, w0, w1);
  }
};

template <typename P, typename G, bool kMaster>
void adamw_typed(const AdamArgs& a) {
  const AdamConsts c(a);
  const AdamStep<P, G, kMaster> step{c};
  for_each_chunk(make_chunks(a.n, a.numels), [&](const Chunk& k, int64_t) {
    const int64_t t = k.tensor, b = k.begin;
    P* p = static_cast<P*>(a.params[t]) + b;
    const G* g = static_cast<const G*>(a.grads[t]) + b;
    if constexpr (kMaster) {
      run(k.size, step, p, g, a.exp_avgs[t] + b, a.exp_avg_sqs[t] + b, a.masters[t] + b);
    } else {
      run(k.size, step, p, g, a.exp_avgs[t] + b, a.exp_avg_sqs[t] + b);
    }
  });
}

template <typename T>
double chunk_sumsq(const T* x, int64_t size) {
  double total = 0.0;
  for (int64_t b = 0; b < size; b += kBlock) {
    Vec acc0(0.0f), acc1(0.0f);
    auto step = [&](const T* p) {
      Vec x0, x1;
      load(p, x0, x1);
      acc0 = at::vec::fmadd(x0, x0, acc0);
      acc1 = at::vec::fmadd(x1, x1, acc1);
    };
    run(std::min(kBlock, size - b), step, x + b);
    total += at::vec::vec_reduce_all<float>([](const Vec& u, const Vec& w) { return u + w; }, acc0 + acc1);
  }
  return total;
}

}  // namespace

void adamw(const AdamArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  with_dtype(a.param_dtype, [&](auto p) {
    with_dtype(a.grad_dtype, [&](auto g) {
      using P = decltype(p);
      using G = decltype(g);
      if (a.masters != nullptr) adamw_typed<P, G, true>(a); else adamw_typed<P, G, false>(a);
    });
  });
}

void sumsq(const ListArgs& a, double* sumsq) {
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto chunks = make_chunks(a.n, a.numels);
    std::vector<double> partial(chunks.size());
    for_each_chunk(chunks, [&](const Chunk& k, int64_t i) {
      partial[i] = chunk_sumsq(static_cast<const T*>(a.tensors[k.tensor]) + k.begin, k.size);
    });
    int64_t i = 0;  // chunks come in tensor order
    for (int64_t t = 0; t < a.n; ++t) {
      sumsq[t] = 0.0;
      for (int64_t b = 0; b < a.numels[t]; b += kChunk) sumsq[t] += partial[i++];
    }
  });
}

void scale(const ListArgs& a, float scale, const float* scale_ptr) {
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const Vec s(scale * (scale_ptr ? *scale_ptr : 1.0f));
    auto step = [&](T* p) {
      Vec x0, x1;
      load(p, x0, x1);
      store(p, x0 * s, x1 * s);
    };
    for_each_chunk(make_chunks(a.n, a.numels), [&](const Chunk& k, int64_t) {
      run(k.size, step, static_cast<T*>(a.tensors[k.tensor]) + k.begin);
    });
  });
}

const char* isa() { return C10_STRINGIZE(CPU_CAPABILITY); }

}  // namespace engine_cpu
