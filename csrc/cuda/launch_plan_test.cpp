// Checks plan_launches (launch_plan.h), the host half of the CUDA multi-tensor apply, without a GPU:
// every chunk of every non-empty tensor exactly once and in order, within the per-launch limits.
// Built and run by tests/test_kernels.py; prints "ok" or the first violation (exit status 1).
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "launch_plan.h"

using engine_cuda::Launch;

namespace {

int fail(const char* what, size_t case_index) {
  std::printf("case %zu: %s\n", case_index, what);
  std::exit(1);
}

void check(const std::vector<int64_t>& numels, int64_t chunk_size, size_t index) {
  std::vector<std::pair<int64_t, int64_t>> expected, seen;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t c = 0; c * chunk_size < numels[t]; ++c) expected.emplace_back(static_cast<int64_t>(t), c);
  const int r = engine_cuda::plan_launches(
      static_cast<int64_t>(numels.size()), numels.data(), chunk_size, [&](const Launch& plan) {
        if (plan.blocks < 1 || plan.blocks > engine_cuda::kMaxBlocks) fail("blocks out of range", index);
        if (plan.tensors < 1 || plan.tensors > engine_cuda::kMaxTensors) fail("tensors out of range", index);
        for (int b = 0; b < plan.blocks; ++b) {
          if (plan.slot[b] >= plan.tensors) fail("block refers to an unused slot", index);
          seen.emplace_back(plan.tensor[plan.slot[b]], plan.chunk[b]);
        }
        return 0;
      });
  if (r != 0) fail("unexpected error", index);
  if (seen != expected) fail("chunks missed, repeated or out of order", index);
}

}  // namespace

int main() {
  std::vector<std::pair<std::vector<int64_t>, int64_t>> cases = {
      {{}, 4}, {{0}, 4}, {{0, 0, 5, 0}, 4}, {{1}, 4},
      {std::vector<int64_t>(36, 4), 4},           // exactly the tensors of one launch
      {std::vector<int64_t>(37, 4), 4},           // one more
      {{320 * 4}, 4}, {{320 * 4 + 1}, 4},         // exactly the blocks of one launch, and one more
      {std::vector<int64_t>(40, 10 * 4 + 1), 4},  // both limits, tensors carried over mid-way
      {{(int64_t{1} << 31) + 5}, 65536},          // over 2^31 elements in real chunks
  };
  std::vector<int64_t> mixed;
  for (int i = 0; i < 300; ++i) mixed.push_back((i * 7919) % 97 == 0 ? 0 : (i * 7919) % 2003);
  cases.emplace_back(mixed, 4);
  for (size_t i = 0; i < cases.size(); ++i) check(cases[i].first, cases[i].second, i);

  int calls = 0;  // an error stops the plan and is returned
  const std::vector<int64_t> many(100, 4 * 320);
  const int r = engine_cuda::plan_launches(100, many.data(), 4, [&](const Launch&) { return ++calls == 2 ? 7 : 0; });
  if (r != 7 || calls != 2) fail("an error did not stop the plan", cases.size());
  std::printf("ok\n");
  return 0;
}
