// Multi-tensor L2 norm (total and per tensor) and in-place scale.
//
// The norm takes three deterministic stages: each block writes the fp32 sum of squares of its chunk to a
// partial-sum slot; one block per tensor adds its chunks' partials in double; one block adds the tensors.
#include <cmath>

#include "multi_tensor.cuh"

namespace engine_cuda {
namespace {

constexpr int kReduceThreads = 256;
constexpr int kMaxSegments = 256;  // tensors per launch of the per-tensor stage

template <typename T>
struct SumSqOp {
  float* partial;

  __device__ void operator()(const TensorMeta<1>& meta, int slot, int64_t start, int n) const {
    const T* x = static_cast<const T*>(meta.ptr[0][slot]) + start;
    const float acc = block_sum_squares(x, n, is_aligned(x));
    if (threadIdx.x == 0) partial[meta.first_chunk + blockIdx.x] = acc;
  }
};

// Block b: tensor first + b, whose chunks' partials are partial[begin[b] .. begin[b + 1]).
struct Segments {
  int64_t begin[kMaxSegments + 1];
  int64_t first;
};

__global__ void __launch_bounds__(kReduceThreads)
    tensor_sums(const float* partial, Segments s, double* sumsq, float* per_tensor) {
  double acc = 0.0;
  for (int64_t i = s.begin[blockIdx.x] + threadIdx.x; i < s.begin[blockIdx.x + 1]; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    sumsq[s.first + blockIdx.x] = acc;
    per_tensor[s.first + blockIdx.x] = static_cast<float>(sqrt(acc));
  }
}

__global__ void __launch_bounds__(kReduceThreads) total_sum(const double* sumsq, int64_t n, float* total) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += sumsq[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *total = static_cast<float>(sqrt(acc));
}

int64_t num_chunks(const ListArgs& a, int64_t i) { return (a.numels[i] + kChunk - 1) / kChunk; }

template <typename T>
struct ScaleOp {
  float scale;
  const float* scale_ptr;

  __device__ void operator()(const TensorMeta<1>& meta, int slot, int64_t start, int n) const {
    const float s = scale * (scale_ptr != nullptr ? *scale_ptr : 1.0f);
    T* x = static_cast<T*>(meta.ptr[0][slot]) + start;
    const bool aligned = is_aligned(x);
    for (int i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
      float r[kILP];
      load(r, x, i, n, aligned);
#pragma unroll
      for (int k = 0; k < kILP; ++k) r[k] *= s;
      store(x, r, i, n, aligned);
    }
  }
};

}  // namespace

// Scratch layout: double sumsq[n], then float partial[chunks].
int64_t l2norm_scratch_size(const ListArgs& a) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < a.n; ++i) chunks += num_chunks(a, i);
  return a.n * static_cast<int64_t>(sizeof(double)) + chunks * static_cast<int64_t>(sizeof(float));
}

cudaError_t l2norm(const ListArgs& a, void* scratch, float* per_tensor, float* total, cudaStream_t stream) {
  double* sumsq = static_cast<double*>(scratch);
  float* partial = reinterpret_cast<float*>(sumsq + a.n);
  void* const* const ptrs[1] = {a.tensors};
  cudaError_t err = with_dtype(a.dtype, [&](auto tag) {
    return multi_tensor_apply(a.n, a.numels, ptrs, SumSqOp<decltype(tag)>{partial}, stream);
  });
  Segments s{};
  int64_t chunk = 0;
  for (int64_t first = 0; first < a.n && err == cudaSuccess; first += kMaxSegments) {
    const int count = static_cast<int>(a.n - first < kMaxSegments ? a.n - first : kMaxSegments);
    s.first = first;
    for (int b = 0; b <= count; ++b) {
      s.begin[b] = chunk;
      if (b < count) chunk += num_chunks(a, first + b);
    }
    tensor_sums<<<count, kReduceThreads, 0, stream>>>(partial, s, sumsq, per_tensor);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
  total_sum<<<1, kReduceThreads, 0, stream>>>(sumsq, a.n, total);
  return cudaGetLastError();
}

cudaError_t scale(const ListArgs& a, float scale, const float* scale_ptr, cudaStream_t stream) {
  void* const* const ptrs[1] = {a.tensors};
  return with_dtype(a.dtype, [&](auto tag) {
    return multi_tensor_apply(a.n, a.numels, ptrs, ScaleOp<decltype(tag)>{scale, scale_ptr}, stream);
  });
}

}  // namespace engine_cuda
