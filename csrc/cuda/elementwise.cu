// The layer's elementwise work, fused: RMSNorm (forward, backward), rotary embedding (forward, backward) and
// SwiGLU (forward, backward). Each kernel computes in fp32 and rounds where the plain torch code of
// engine/models/llama.py rounds (one product of two bf16 tensors is one rounding), so in bf16/fp16 the results
// are those of the plain code up to the order of the row sums (RMSNorm) and the last bit of exp (SiLU).
//
// Partitions are fixed by the shapes, never by the device, so results are deterministic and the same on every GPU.
#include <cmath>

#include "multi_tensor.cuh"

namespace engine_cuda {
namespace {

// x rounded to T and back (exact for fp32): where the plain code holds an intermediate in the tensors' dtype.
template <typename T>
__device__ __forceinline__ float rounded(float x) {
  return to_float(from_float<T>(x));
}

int row_threads(int64_t cols) {  // a multiple of 32 (block_sum), one pack of kILP columns per thread up to 512
  const int64_t packs = (cols + kILP - 1) / kILP;
  const int64_t warps = (packs + 31) / 32;
  return static_cast<int>(warps < 1 ? 32 : warps > kThreads / 32 ? kThreads : warps * 32);
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm: y = w * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) in fp32; one block per row.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const T* x, const T* w, float eps, int cols, T* y, float* rstd) {
  __shared__ float row_rstd;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const bool aligned = is_aligned(xr) && is_aligned(w) && is_aligned(yr);
  const float acc = block_sum_squares(xr, cols, aligned);
  if (threadIdx.x == 0) {
    row_rstd = rsqrtf(acc / static_cast<float>(cols) + eps);
    rstd[row] = row_rstd;
  }
  __syncthreads();
  const float s = row_rstd;
  for (int i = threadIdx.x * kILP; i < cols; i += blockDim.x * kILP) {
    float r[kILP], g[kILP];
    load(r, xr, i, cols, aligned);
    load(g, w, i, cols, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = g[k] * rounded<T>(r[k] * s);
    store(yr, r, i, cols, aligned);
  }
}

// dx = rstd * (g - x * rstd^2 * mean(g * x)), g = round(dy * w); the weight gradient's fp32 partial sums of
// round(dy * round(x * rstd)) over this block's rows go to partial[blockIdx.x, :]. Each thread owns the same
// columns in every row, so its accumulators (shared memory, one float per column) need no synchronisation.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_backward_kernel(const T* dy, const T* x, const T* w, const float* rstd, int64_t rows, int cols,
                             int64_t rows_per_block, T* dx, float* partial) {
  extern __shared__ float acc[];
  __shared__ float row_dot;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) acc[i] = 0.0f;
  __syncthreads();
  const int64_t first = blockIdx.x * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  for (int64_t row = first; row < last; ++row) {
    const T* dyr = dy + row * cols;
    const T* xr = x + row * cols;
    T* dxr = dx + row * cols;
    const bool aligned = is_aligned(dyr) && is_aligned(xr) && is_aligned(w) && is_aligned(dxr);
    const float s = rstd[row];
    float dot = 0.0f;
    for (int i = threadIdx.x * kILP; i < cols; i += blockDim.x * kILP) {
      float d[kILP], r[kILP], g[kILP];
      load(d, dyr, i, cols, aligned);
      load(r, xr, i, cols, aligned);
      load(g, w, i, cols, aligned);
#pragma unroll
      for (int k = 0; k < kILP; ++k) dot += rounded<T>(d[k] * g[k]) * r[k];
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) row_dot = dot;
    __syncthreads();
    const float coef = row_dot * s * s * s / static_cast<float>(cols);
    for (int i = threadIdx.x * kILP; i < cols; i += blockDim.x * kILP) {
      float d[kILP], r[kILP], g[kILP], out[kILP];
      load(d, dyr, i, cols, aligned);
      load(r, xr, i, cols, aligned);
      load(g, w, i, cols, aligned);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        out[k] = rounded<T>(d[k] * g[k]) * s - r[k] * coef;
        if (i + k < cols) acc[i + k] += rounded<T>(d[k] * rounded<T>(r[k] * s));
      }
      store(dxr, out, i, cols, aligned);
    }
    __syncthreads();  // row_dot is rewritten by the next row
  }
  for (int i = threadIdx.x * kILP; i < cols; i += blockDim.x * kILP)
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      if (i + k < cols) partial[blockIdx.x * static_cast<int64_t>(cols) + i + k] = acc[i + k];
}

// dw[c] = the sum of partial[0 .. blocks, c]: thread (x, y) of a block sums the partials y, y + kSumRows, ... of
// column blockIdx.x * 32 + x (32 consecutive columns per warp: coalesced), then the kSumRows sums are added in y
// order through shared memory.
constexpr int kSumRows = 16;

template <typename T>
__global__ void __launch_bounds__(32 * kSumRows)
    rms_norm_weight_grad_kernel(const float* partial, int64_t blocks, int cols, T* dw) {
  __shared__ float sums[kSumRows][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float sum = 0.0f;
  if (c < cols)
    for (int64_t b = threadIdx.y; b < blocks; b += kSumRows) sum += partial[b * cols + c];
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
    for (int y = 0; y < kSumRows; ++y) total += sums[y][threadIdx.x];
    dw[c] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Rotary embedding, half-split convention: out[j] = x[j] cos[j] - x[j + d/2] sin[j],
// out[j + d/2] = x[j + d/2] cos[j + d/2] + x[j] sin[j + d/2]; backward applies the transposed rotation.

// A block takes kRopeRowsPerBlock rows (one (batch, head, position) each): threadIdx.y picks the row, threadIdx.x
// walks its d/2 pairs. 32-bit index arithmetic for the row (the launcher refuses more rows), 64-bit offsets.
constexpr int kRopeThreadsX = 32, kRopeRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kRopeThreadsX * kRopeRowsPerBlock) rope_kernel(RopeArgs a) {
  const T* x = static_cast<const T*>(a.x);
  const T* cos = static_cast<const T*>(a.cos);
  const T* sin = static_cast<const T*>(a.sin);
  T* out = static_cast<T*>(a.out);
  const int half = static_cast<int>(a.dim / 2), seq = static_cast<int>(a.seq), heads = static_cast<int>(a.heads);
  const int row = blockIdx.x * kRopeRowsPerBlock + threadIdx.y;
  if (row >= static_cast<int>(a.batch) * heads * seq) return;
  const int s = row % seq, h = (row / seq) % heads, b = row / (seq * heads);
  const int64_t in_row = b * a.in_stride[0] + h * a.in_stride[1] + s * a.in_stride[2];
  const int64_t out_row = b * a.out_stride[0] + h * a.out_stride[1] + s * a.out_stride[2];
  for (int j = threadIdx.x; j < half; j += kRopeThreadsX) {
    const int64_t in = in_row + j, o = out_row + j;
    const float x1 = to_float(x[in]), x2 = to_float(x[in + half]);
    const float c1 = to_float(cos[s * a.dim + j]), c2 = to_float(cos[s * a.dim + j + half]);
    const float s1 = to_float(sin[s * a.dim + j]), s2 = to_float(sin[s * a.dim + j + half]);
    if (!a.backward) {
      out[o] = from_float<T>(rounded<T>(x1 * c1) - rounded<T>(x2 * s1));
      out[o + half] = from_float<T>(rounded<T>(x2 * c2) + rounded<T>(x1 * s2));
    } else {
      out[o] = from_float<T>(rounded<T>(x1 * c1) + rounded<T>(x2 * s2));
      out[o + half] = from_float<T>(rounded<T>(x2 * c2) - rounded<T>(x1 * s1));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU: y = round(silu(gate)) * up; one block per kSwigluChunk elements.

// As ATen computes them: silu(x) = x / (1 + exp(-x)); its derivative from sigmoid(x) = 1 / (1 + exp(-x)).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

constexpr int kSwigluChunk = 8192;  // elements per block: enough blocks for every SM from ~1M elements on

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const T* gate, const T* up, int64_t numel, T* y) {
  const int64_t start = blockIdx.x * static_cast<int64_t>(kSwigluChunk);
  const int n = static_cast<int>(numel - start < kSwigluChunk ? numel - start : kSwigluChunk);
  gate += start, up += start, y += start;
  const bool aligned = is_aligned(gate) && is_aligned(up) && is_aligned(y);
  for (int i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
    float g[kILP], u[kILP];
    load(g, gate, i, n, aligned);
    load(u, up, i, n, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) g[k] = rounded<T>(silu(g[k])) * u[k];
    store(y, g, i, n, aligned);
  }
}

// d_up = dy * round(silu(gate)); d_gate = round(dy * up) * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))).
template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(const T* dy, const T* gate, const T* up,
                                                                   int64_t numel, T* dgate, T* dup) {
  const int64_t start = blockIdx.x * static_cast<int64_t>(kSwigluChunk);
  const int n = static_cast<int>(numel - start < kSwigluChunk ? numel - start : kSwigluChunk);
  dy += start, gate += start, up += start, dgate += start, dup += start;
  const bool aligned = is_aligned(dy) && is_aligned(gate) && is_aligned(up) && is_aligned(dgate) && is_aligned(dup);
  for (int i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
    float d[kILP], g[kILP], u[kILP], dg[kILP], du[kILP];
    load(d, dy, i, n, aligned);
    load(g, gate, i, n, aligned);
    load(u, up, i, n, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const float sg = sigmoid(g[k]);
      du[k] = d[k] * rounded<T>(silu(g[k]));
      dg[k] = rounded<T>(d[k] * u[k]) * sg * (1.0f + g[k] * (1.0f - sg));
    }
    store(dgate, dg, i, n, aligned);
    store(dup, du, i, n, aligned);
  }
}

int64_t chunks(int64_t numel) { return (numel + kSwigluChunk - 1) / kSwigluChunk; }

// How the backward splits `rows` (> 0): rows per block (each writes one partial sum), and the blocks that takes
// (at most kNormPartials, every one with at least a row).
struct NormPartials {
  int64_t per_block, blocks;
  explicit NormPartials(int64_t rows)
      : per_block((rows + kNormPartials - 1) / kNormPartials), blocks((rows + per_block - 1) / per_block) {}
};

}  // namespace

int64_t rms_norm_backward_scratch_size(int64_t rows, int64_t cols) {
  return rows == 0 ? 0 : NormPartials(rows).blocks * cols * static_cast<int64_t>(sizeof(float));
}

cudaError_t rms_norm(const RowsArgs& a, const void* weight, float eps, void* y, float* rstd, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T><<<static_cast<unsigned>(a.rows), row_threads(a.cols), 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(weight), eps, static_cast<int>(a.cols),
        static_cast<T*>(y), rstd);
    return cudaGetLastError();
  });
}

cudaError_t rms_norm_backward(const RowsArgs& a, const void* dy, const void* weight, const float* rstd, void* dx,
                              void* dweight, void* scratch, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const NormPartials split(a.rows);
  const int64_t per_block = split.per_block, blocks = split.blocks;
  const int cols = static_cast<int>(a.cols);
  const size_t shared = static_cast<size_t>(cols) * sizeof(float);
  float* partial = static_cast<float*>(scratch);
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t err = cudaFuncSetAttribute(rms_norm_backward_kernel<T>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err != cudaSuccess) return err;
    rms_norm_backward_kernel<T><<<static_cast<unsigned>(blocks), row_threads(cols), shared, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(a.x), static_cast<const T*>(weight), rstd, a.rows, cols,
        per_block, static_cast<T*>(dx), partial);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    rms_norm_weight_grad_kernel<T><<<(cols + 31) / 32, dim3(32, kSumRows), 0, stream>>>(partial, blocks, cols,
                                                                                       static_cast<T*>(dweight));
    return cudaGetLastError();
  });
}

cudaError_t rope(const RopeArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.heads * a.seq;
  if (rows == 0 || a.dim == 0) return cudaSuccess;
  if (rows > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t blocks = (rows + kRopeRowsPerBlock - 1) / kRopeRowsPerBlock;
  return with_dtype(a.dtype, [&](auto tag) {
    rope_kernel<decltype(tag)><<<static_cast<unsigned>(blocks), dim3(kRopeThreadsX, kRopeRowsPerBlock), 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t swiglu(int64_t numel, DType dtype, const void* gate, const void* up, void* y, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_kernel<T><<<static_cast<unsigned>(chunks(numel)), kThreads, 0, stream>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), numel, static_cast<T*>(y));
    return cudaGetLastError();
  });
}

cudaError_t swiglu_backward(int64_t numel, DType dtype, const void* dy, const void* gate, const void* up,
                            void* dgate, void* dup, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_backward_kernel<T><<<static_cast<unsigned>(chunks(numel)), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up), numel,
        static_cast<T*>(dgate), static_cast<T*>(dup));
    return cudaGetLastError();
  });
}

}  // namespace engine_cuda
