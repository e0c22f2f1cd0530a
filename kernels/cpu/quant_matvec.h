// Mat-vec kernels for int8 / int4 weights on the CPU, for the few rows of a decode step.
//
// Weights (mistral/quantize.py's formats, read as they are):
//   int8   w [N, K] int8, scales [N]               W[n, k] = w[n, k] * scales[n]
//   int4   w [N, K/2] uint8, scales [N, K/G]       W[n, k] = (nibble(n, k) - 8) * scales[n, k / G],
//                                                  nibble(n, 2j) = w[n, j] & 15, nibble(n, 2j+1) = w[n, j] >> 4
// Activations x [M, K] (fp32 or bf16) are quantized per block of 32 inputs, as llama.cpp's q8_0:
//   d_b = max |x| over the block / 127,   xq[k] = round_half_even(x[k] * (127 / max |x|))  in [-127, 127]
// so that y[m, n] = sum_b d_b * (int32 dot of block b) * weight scale: integer products, accumulated
// exactly in int32 within a block, in fp32 across blocks.
//
// Two calls per mat-vec: `prepare` quantizes x into a workspace once (in the order the compiled-in
// instruction set wants), then `rows` computes outputs [n0, n1) from it; callers split [0, N) across
// threads. This file knows nothing of PyTorch (ops.cpp binds it), so that tests can build it alone.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mfs {

enum DType : int { F32 = 0, BF16 = 1 };
enum Format : int { INT8 = 0, INT4 = 1 };

// The instruction set compiled in: "avx512-vnni", "avx2" or "scalar".
const char* isa();

// Bytes of the workspace `prepare` fills for M rows of K inputs (64-byte aligned, please).
size_t workspace_bytes(int64_t M, int64_t K);

// x [M, K] of dtype x_dtype (K a multiple of 32) -> ws, for weights of `format`.
void prepare(Format format, const void* x, DType x_dtype, int64_t M, int64_t K, uint8_t* ws);

// out[m, n] for n in [n0, n1) (out [M, N] of dtype out_dtype, row stride N); group: int4 only, a
// multiple of 32 that divides 512 and K.
void int8_rows(const uint8_t* ws, int64_t M, int64_t K, const int8_t* w, const void* scales, DType s_dtype,
               void* out, DType out_dtype, int64_t N, int64_t n0, int64_t n1);
void int4_rows(const uint8_t* ws, int64_t M, int64_t K, const uint8_t* w, const void* scales, DType s_dtype,
               int64_t group, void* out, DType out_dtype, int64_t N, int64_t n0, int64_t n1);

}  // namespace mfs
