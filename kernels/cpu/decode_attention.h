// Causal grouped-query attention of a few new tokens over cached keys and values, on the CPU: the
// decode step's attention, where PyTorch's CPU SDPA spends ~40 us a layer on ~1 MFLOP.
//
//   q   [B, T, H, D]    the new tokens' queries; row b's token t sits at position pos[b] + t
//   k   [B, Hkv, L, D]  cached keys; key j sits at position j
//   v   [B, Hkv, L, D]
//   out [B, T, H, D]    softmax over the keys j with pos - window < j <= pos (window 0: no limit)
//                       of (q · k_j) / sqrt(D), times v_j; query head h reads key/value head
//                       h / (H / Hkv)
//
// q, k, v and out are fp32 or bf16 (each its own); the arithmetic is fp32. A query row that sees no
// key gets zeros. This file knows nothing of PyTorch (ops.cpp binds it).
#pragma once

#include <cstdint>

#include "quant_matvec.h"  // DType

namespace mfs {

// Rows [g0, g1) of the B * Hkv (batch row, key/value head) groups: callers split them across threads.
void decode_attention(const void* q, DType qt, const void* k, const void* v, DType kvt, const int64_t* pos,
                      int64_t T, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t window, void* out, DType ot,
                      int64_t g0, int64_t g1);

}  // namespace mfs
