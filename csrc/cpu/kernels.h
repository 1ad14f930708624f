// The CPU kernels (kernels.cpp), called by binding.cpp.
#pragma once
#include "../kernel_args.h"

namespace engine_cpu {

using engine_kernels::AdamArgs;
using engine_kernels::DType;
using engine_kernels::ListArgs;

void adamw(const AdamArgs& args);
// sumsq[i] = the sum of squares of tensor i (fp32 accumulation, summed across chunks in double).
void sumsq(const ListArgs& args, double* sumsq);
// tensors *= scale (times *scale_ptr if set), in place.
void scale(const ListArgs& args, float scale, const float* scale_ptr);

// The instruction set the kernels were compiled for: ATen's CPU_CAPABILITY (DEFAULT, AVX2 or AVX512), which
// engine/ext.py sets from torch's own capability on the machine that builds them.
const char* isa();

}  // namespace engine_cpu
