// Mat-vec for fp32 / bf16 weights on the CPU, for the few rows of a decode step:
//   out[m, n] = sum_k x[m, k] * w[n, k],   x [M, K] and w [N, K] fp32 or bf16, products and sums in fp32
// Two calls, as quant_matvec.h: `float_prepare` converts x to fp32 once, `float_rows` computes
// outputs [n0, n1) from it; callers split [0, N) across threads. Knows nothing of PyTorch.
#pragma once

#include <cstdint>

#include "quant_matvec.h"  // DType

namespace mfs {

// The instruction set compiled in: "avx512", "avx2" or "scalar".
const char* float_isa();

// x [M, K] of dtype x_dtype -> xf [M, K] fp32.
void float_prepare(const void* x, DType x_dtype, int64_t M, int64_t K, float* xf);

// out[m, n] for n in [n0, n1) (out [M, N] of dtype out_dtype, row stride N).
void float_rows(const float* xf, int64_t M, int64_t K, const void* w, DType w_dtype, void* out, DType out_dtype,
                int64_t N, int64_t n0, int64_t n1);

}  // namespace mfs
