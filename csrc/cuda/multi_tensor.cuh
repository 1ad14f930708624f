// Multi-tensor apply: one kernel launch covers up to kMaxBlocks chunks of up to kMaxTensors tensors, whose
// addresses travel in the kernel's argument (TensorMeta, < 4 KB), so a whole model takes a few launches and no
// host-to-device copies. Each block handles one chunk of kChunk elements; offsets are 64-bit, so tensors of
// more than 2^31 elements work; empty tensors take no block.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "launch_plan.h"

namespace engine_cuda {

constexpr int kChunk = 65536;  // elements per block
constexpr int kThreads = 512;
constexpr int kILP = 4;  // consecutive elements per thread and iteration: one 16-byte load of fp32

template <int Depth>
struct TensorMeta {
  void* ptr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char tensor[kMaxBlocks];  // block -> slot of its tensor
  int chunk[kMaxBlocks];             // block -> chunk of that tensor
  int64_t first_chunk;               // index of block 0's chunk among all chunks of the call
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct alignas(sizeof(T) * kILP) Pack {
  T v[kILP];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// r = p[i .. i + kILP) as floats (zeros past n): one vector load when aligned and whole.
template <typename T>
__device__ __forceinline__ void load(float (&r)[kILP], const T* p, int i, int n, bool aligned) {
  if (aligned && i + kILP <= n) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = to_float(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = i + k < n ? to_float(p[i + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store(T* p, const float (&r)[kILP], int i, int n, bool aligned) {
  if (aligned && i + kILP <= n) {
    Pack<T> pk;
#pragma unroll
    for (int k = 0; k < kILP; ++k) pk.v[k] = from_float<T>(r[k]);
    *reinterpret_cast<Pack<T>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      if (i + k < n) p[i + k] = from_float<T>(r[k]);
  }
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// The sum of squares of x[0 .. n) over the block (fp32 accumulation), valid in thread 0.
template <typename T>
__device__ float block_sum_squares(const T* x, int n, bool aligned) {
  float acc = 0.0f;
  for (int i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
    float r[kILP];
    load(r, x, i, n, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) acc += r[k] * r[k];
  }
  return block_sum(acc);
}

// op(meta, slot, start, n): block blockIdx.x handles elements [start, start + n) of the tensor in `slot`.
template <int Depth, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorMeta<Depth> meta, Op op) {
  const int slot = meta.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t left = meta.numel[slot] - start;
  op(meta, slot, start, static_cast<int>(left < kChunk ? left : kChunk));
}

// Runs op over every chunk of the n tensors; ptrs[d][i] is tensor i's pointer for operand d.
template <int Depth, typename Op>
cudaError_t multi_tensor_apply(int64_t n, const int64_t* numels, void* const* const (&ptrs)[Depth], const Op& op,
                               cudaStream_t stream) {
  TensorMeta<Depth> meta{};
  return plan_launches(n, numels, kChunk, [&](const Launch& plan) {
    for (int s = 0; s < plan.tensors; ++s) {
      for (int d = 0; d < Depth; ++d) meta.ptr[d][s] = ptrs[d][plan.tensor[s]];
      meta.numel[s] = numels[plan.tensor[s]];
    }
    for (int b = 0; b < plan.blocks; ++b) {
      meta.tensor[b] = plan.slot[b];
      meta.chunk[b] = plan.chunk[b];
    }
    multi_tensor_kernel<Depth, Op><<<plan.blocks, kThreads, 0, stream>>>(meta, op);
    meta.first_chunk += plan.blocks;
    return cudaGetLastError();
  });
}

template <typename F>
cudaError_t with_dtype(DType d, const F& f) {
  switch (d) {
    case DType::kFloat: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kHalf: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace engine_cuda
