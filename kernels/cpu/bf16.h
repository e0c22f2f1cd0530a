// bf16 <-> fp32, and a scalar load / store of an fp32 or bf16 array: what every kernel here shares.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_matvec.h"  // DType

namespace mfs {

inline float bf16_to_float(uint16_t h) {  // exact: a bf16 is an fp32's top half
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as PyTorch; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline float load_scalar(const void* p, DType t, int64_t i) {
  return t == F32 ? static_cast<const float*>(p)[i] : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

inline void store_scalar(void* p, DType t, int64_t i, float v) {
  if (t == F32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
}

}  // namespace mfs
