// How multi-tensor apply (multi_tensor.cuh) splits a call into kernel launches. Plain C++ (no CUDA), so that
// launch_plan_test.cpp can check it with any C++ compiler.
#pragma once
#include <cstdint>
#include <utility>

namespace engine_cuda {

constexpr int kMaxTensors = 36;  // per launch: the addresses travel in the kernel's argument (< 4 KB)
constexpr int kMaxBlocks = 320;

// One launch: `tensors` slots (tensor index of each) and `blocks` blocks, block b working on chunk chunk[b] of
// the tensor in slot slot[b].
struct Launch {
  int tensors = 0;
  int64_t tensor[kMaxTensors];
  int blocks = 0;
  unsigned char slot[kMaxBlocks];
  int chunk[kMaxBlocks];
};

// Calls launch(plan) for batches that cover every chunk (of chunk_size elements) of every non-empty tensor once,
// in order of tensor then chunk; a tensor whose chunks do not fit goes on in the next launch, from slot 0. Stops
// at, and returns, the first result of launch() that is not R{} (success).
template <typename F>
auto plan_launches(int64_t n, const int64_t* numels, int64_t chunk_size, const F& launch)
    -> decltype(launch(std::declval<const Launch&>())) {
  using R = decltype(launch(std::declval<const Launch&>()));
  Launch plan;
  for (int64_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    plan.tensor[plan.tensors++] = i;
    const int64_t chunks = (numels[i] + chunk_size - 1) / chunk_size;
    for (int64_t c = 0; c < chunks; ++c) {
      plan.slot[plan.blocks] = static_cast<unsigned char>(plan.tensors - 1);
      plan.chunk[plan.blocks++] = static_cast<int>(c);
      const bool last_chunk = c + 1 == chunks;
      if (plan.blocks < kMaxBlocks && !(last_chunk && plan.tensors == kMaxTensors)) continue;
      if (const R r = launch(plan); r != R{}) return r;
      plan.blocks = 0;
      plan.tensors = 0;
      if (!last_chunk) plan.tensor[plan.tensors++] = i;  // an unfinished tensor goes on, from slot 0
    }
  }
  return plan.blocks > 0 ? launch(plan) : R{};
}

}  // namespace engine_cuda
