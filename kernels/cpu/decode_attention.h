// Causal grouped-query attention of a few new tokens over cached keys and values, on the CPU: the
// decode step's attention, where PyTorch's CPU SDPA spends ~40 us a layer on ~1 MFLOP.
//
//   q   [B, T, H, D]    the new tokens' queries; row b's token t sits at position pos[b] + t
//   k, v                cached keys and values; key j (at position j) of row b, head h is the D
//                       elements at `KVRows::row` (below): a [B, Hkv, L, D] tensor's, or a paged pool's
//                       [num_blocks, block_size, Hkv, D] through a block table [B, n]
//   out [B, T, H, D]    softmax over the keys j < L with pos - window < j <= pos (window 0: no limit)
//                       of (q · k_j) / sqrt(D), times v_j; query head h reads key/value head
//                       h / (H / Hkv)
//
// q, k, v and out are fp32 or bf16 (q and out each its own, k and v one); the arithmetic is fp32. A
// query row that sees no key gets zeros. This file knows nothing of PyTorch (ops.cpp binds it).
#pragma once

#include <cstdint>

#include "quant_matvec.h"  // DType

namespace mfs {

// Where key (or value) j of batch row b, key/value head h starts, in elements from the base pointer.
// Without a table: b * batch + j * position + h * head (a tensor's strides). With one: position j of
// row b lives in block table[b * table_width + j / block_size], slot j % block_size, and the strides
// are the pool's: block * batch + slot * position + h * head.
struct KVRows {
  int64_t batch, position, head;          // strides: of a batch row (or a block), a position (or a slot), a head
  const int64_t* table = nullptr;         // [B, table_width] block ids, or none
  int64_t table_width = 0, block_size = 0;
  int64_t L;                              // positions a row may read: keys j < L

  int64_t row(int64_t b, int64_t j, int64_t h) const {
    if (table == nullptr) return b * batch + j * position + h * head;
    return table[b * table_width + j / block_size] * batch + (j % block_size) * position + h * head;
  }
};

// Rows [g0, g1) of the B * Hkv (batch row, key/value head) groups: callers split them across threads.
void decode_attention(const void* q, DType qt, const void* k, const void* v, DType kvt, const KVRows& rows,
                      const int64_t* pos, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t window, void* out,
                      DType ot, int64_t g0, int64_t g1);

}  // namespace mfs
