// The kernels of quant_matvec.h, for the instruction set the compiler targets (-march=native):
//
//   avx512-vnni  64 inputs a step: vpdpbusd (u8 x s8 -> s32, four products a lane), the weights'
//                sign handled by a per-lane bias the accumulator starts from (see `prepare`)
//   avx2         32 inputs (one block) a step: vpmaddubsw + vpmaddwd
//   scalar       portable C++; also the definition the others must match
//
// Every path computes the same integer dot product of each block exactly, so they differ only in
// the order of the fp32 sums across blocks.
#include "quant_matvec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define MFS_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define MFS_AVX2 1
#include <immintrin.h>
#endif

namespace mfs {

namespace {

constexpr int64_t BLOCK = 32;  // inputs per activation scale
constexpr int MAX_MM = 4;      // activation rows computed together against one load of a weight row

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Workspace of one activation row (all offsets 64-byte aligned):
//   xq    [Kp] int8         the quantized inputs, zero past K; order: natural, or permuted for int4
//   d     [nbp] float       block scales, zero past the last block
//   sx    [nbp] int32       sum of xq over each block (avx2 int4: the -8 of the nibbles)
//   lane_d    [Kp/4] float  avx512: the block scale of each int32 lane of a 64-input step
//   lane_bias [Kp/4] int32  avx512: what each lane's dot product starts from (the sign correction)
struct Layout {
  int64_t Kp, nbp, stride;
  explicit Layout(int64_t K) : Kp(round_up(K, 64)), nbp(round_up(Kp / BLOCK, 16)), stride(3 * Kp + 8 * nbp) {}
  int8_t* xq(uint8_t* ws, int64_t m) const { return reinterpret_cast<int8_t*>(ws + m * stride); }
  float* d(uint8_t* ws, int64_t m) const { return reinterpret_cast<float*>(ws + m * stride + Kp); }
  int32_t* sx(uint8_t* ws, int64_t m) const { return reinterpret_cast<int32_t*>(ws + m * stride + Kp + 4 * nbp); }
  float* lane_d(uint8_t* ws, int64_t m) const { return reinterpret_cast<float*>(ws + m * stride + Kp + 8 * nbp); }
  int32_t* lane_bias(uint8_t* ws, int64_t m) const {
    return reinterpret_cast<int32_t*>(ws + m * stride + 2 * Kp + 8 * nbp);
  }
  const int8_t* xq(const uint8_t* ws, int64_t m) const { return xq(const_cast<uint8_t*>(ws), m); }
  const float* d(const uint8_t* ws, int64_t m) const { return d(const_cast<uint8_t*>(ws), m); }
  const int32_t* sx(const uint8_t* ws, int64_t m) const { return sx(const_cast<uint8_t*>(ws), m); }
  const float* lane_d(const uint8_t* ws, int64_t m) const { return lane_d(const_cast<uint8_t*>(ws), m); }
  const int32_t* lane_bias(const uint8_t* ws, int64_t m) const { return lane_bias(const_cast<uint8_t*>(ws), m); }
};

float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even, as PyTorch; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

float load_scalar(const void* p, DType t, int64_t i) {
  return t == F32 ? static_cast<const float*>(p)[i] : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

void store_scalar(void* p, DType t, int64_t i, float v) {
  if (t == F32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
}

// The quantization every path shares: block scale and rounding, in the order the header states.
[[maybe_unused]] void quantize_block(const void* x, DType t, int64_t k0, int8_t* q, float* d, int32_t* sx) {
  float v[BLOCK], amax = 0.f;
  for (int i = 0; i < BLOCK; ++i) {
    v[i] = load_scalar(x, t, k0 + i);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int i = 0; i < BLOCK; ++i) {
    q[i] = int8_t(std::nearbyint(v[i] * inv));  // the default rounding mode: half to even
    sum += q[i];
  }
  *d = amax / 127.f;
  *sx = sum;
}

// --- prepare -------------------------------------------------------------------------------------

#if MFS_AVX512

__m512 load16(const void* x, DType t, int64_t i) {
  if (t == F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One block of 32 inputs -> two vectors of 16 int32 in [-127, 127], its scale and its sum.
void quantize_block16x2(const void* x, DType t, int64_t k0, __m512i& q0, __m512i& q1, float& d, int32_t& sx) {
  __m512 v0 = load16(x, t, k0), v1 = load16(x, t, k0 + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // MXCSR's default: half to even
  q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  d = amax / 127.f;
  sx = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}

// One row: per 64-input step (two blocks, or one at the end when K % 64 == 32) the inputs as
// vpdpbusd's signed operand, and what each of its 16 lanes starts from.
//   int8: natural order; the weights are made unsigned by w + 128, so a lane starts at
//         -128 * (the sum of its 4 inputs) and ends at the signed dot product.
//   int4: the weights' low nibbles (inputs 2j) then their high nibbles (2j + 1), as the kernel
//         unpacks 32 bytes: the step's 32 even inputs then its 32 odd ones; a lane starts at
//         -8 * (the sum of its 4 inputs), the nibbles' offset.
void prepare_row(Format format, const void* x, DType t, int64_t K, const Layout& L, uint8_t* ws, int64_t m) {
  int8_t* xq = L.xq(ws, m);
  float* d = L.d(ws, m);
  int32_t* sx = L.sx(ws, m);
  float* lane_d = L.lane_d(ws, m);
  int32_t* lane_bias = L.lane_bias(ws, m);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i ones = _mm512_set1_epi8(1);
  std::fill(d, d + L.nbp, 0.f);
  std::fill(sx, sx + L.nbp, 0);
  for (int64_t c = 0; c < L.Kp / 64; ++c) {
    const int64_t b = 2 * c;
    __m512i q[4];
    quantize_block16x2(x, t, 64 * c, q[0], q[1], d[b], sx[b]);
    if (64 * c + 32 < K) {
      quantize_block16x2(x, t, 64 * c + 32, q[2], q[3], d[b + 1], sx[b + 1]);
    } else {
      q[2] = q[3] = _mm512_setzero_si512();
    }
    __m128i* out = reinterpret_cast<__m128i*>(xq + 64 * c);
    if (format == INT8) {
      for (int i = 0; i < 4; ++i) _mm_store_si128(out + i, _mm512_cvtsepi32_epi8(q[i]));
    } else {
      _mm_store_si128(out + 0, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[0], even, q[1])));
      _mm_store_si128(out + 1, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[2], even, q[3])));
      _mm_store_si128(out + 2, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[0], odd, q[1])));
      _mm_store_si128(out + 3, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[2], odd, q[3])));
    }
    // the lane sums of the stored order, by the same instruction the kernel uses
    const __m512i lane_sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                                 _mm512_load_si512(reinterpret_cast<const void*>(xq + 64 * c)));
    const int shift = format == INT8 ? 7 : 3;  // -128 or -8 times the sum
    _mm512_store_si512(lane_bias + 16 * c, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(lane_sum, shift)));
    _mm512_store_ps(lane_d + 16 * c, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d[b]), _mm512_set1_ps(d[b + 1])));
  }
}

#else

// Natural order, except avx2's int4: each block as its 16 even inputs then its 16 odd ones, the
// order in which the kernel unpacks a block's 16 bytes of nibbles.
void prepare_row(Format format, const void* x, DType t, int64_t K, const Layout& L, uint8_t* ws, int64_t m) {
  int8_t* xq = L.xq(ws, m);
  float* d = L.d(ws, m);
  int32_t* sx = L.sx(ws, m);
  std::fill(xq, xq + L.Kp, 0);
  std::fill(d, d + L.nbp, 0.f);
  std::fill(sx, sx + L.nbp, 0);
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    int8_t q[BLOCK];
    quantize_block(x, t, b * BLOCK, q, d + b, sx + b);
#if MFS_AVX2
    if (format == INT4) {
      for (int i = 0; i < BLOCK / 2; ++i) {
        xq[b * BLOCK + i] = q[2 * i];
        xq[b * BLOCK + BLOCK / 2 + i] = q[2 * i + 1];
      }
      continue;
    }
#endif
    std::memcpy(xq + b * BLOCK, q, BLOCK);
  }
  (void)format;
}

#endif

// --- the dot products of one weight row with MM activation rows ----------------------------------
//
// Each writes MM sums y[i] = sum over blocks of (activation scale * weight scale * integer dot),
// for activation rows m0 .. m0+MM-1; int8's per-channel scale is applied by the caller. A weight
// row is loaded once for all MM rows.

#if MFS_AVX512

template <int MM>
void int8_row(const int8_t* w, const void*, DType, int64_t, int64_t K, const Layout& L, const uint8_t* ws,
              int64_t m0, float* y) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));  // w + 128: vpdpbusd's unsigned operand
  __m512 acc[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm512_setzero_ps();
  auto step = [&](__m512i wv, int64_t c) {
    wv = _mm512_xor_si512(wv, flip);
    for (int i = 0; i < MM; ++i) {
      const __m512i bias = _mm512_load_si512(L.lane_bias(ws, m0 + i) + 16 * c);
      const __m512i dot = _mm512_dpbusd_epi32(bias, wv, _mm512_load_si512(L.xq(ws, m0 + i) + 64 * c));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(L.lane_d(ws, m0 + i) + 16 * c), acc[i]);
    }
  };
  const int64_t full = K / 64;
  for (int64_t c = 0; c < full; ++c) step(_mm512_loadu_si512(w + 64 * c), c);
  if (K % 64) step(_mm512_maskz_loadu_epi8(0xFFFFFFFFull, w + 64 * full), full);  // the last 32
  for (int i = 0; i < MM; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

// The scales of blocks b0 .. b0+15 (b0 a multiple of 16) of one weight row as fp32, zero past the
// row's last group; a group spans per_group blocks (1, 2, 4, 8 or 16).
__m512 block_scales16(const void* s, DType t, int64_t b0, int64_t groups, int64_t per_group) {
  const int64_t g0 = b0 / per_group, n = std::min<int64_t>(16 / per_group, groups - g0);
  const __mmask16 mask = __mmask16((1u << n) - 1);
  __m512 v;
  if (t == F32) {
    v = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(s) + g0);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(s) + g0);
    v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if (per_group == 1) return v;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int log2 = __builtin_ctzll(uint64_t(per_group));
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(lane, _mm512_set1_epi32(log2)), v);
}

template <int MM>
void int4_row(const uint8_t* w, const void* s, DType st, int64_t per_group, int64_t K, const Layout& L,
              const uint8_t* ws, int64_t m0, float* y) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // a step's 32 bytes in both halves; the upper half shifted right by 4: [low nibbles | high nibbles]
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  // lane l of a step holds inputs of block 2c + pattern[l] (see prepare_row)
  const __m512i pattern = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  const int64_t blocks = K / BLOCK, groups = blocks / per_group, steps = L.Kp / 64;
  __m512 acc[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
    const __m512 sw = block_scales16(s, st, b0, groups, per_group);
    __m512 scale[MM];  // activation scale x weight scale, per block of the window
    for (int i = 0; i < MM; ++i) scale[i] = _mm512_mul_ps(sw, _mm512_load_ps(L.d(ws, m0 + i) + b0));
    const int64_t c_end = std::min(steps, b0 / 2 + 8);
    for (int64_t c = b0 / 2; c < c_end; ++c) {
      const uint8_t* p = w + 32 * c;
      const __m256i raw = 64 * c + 64 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                           : _mm256_maskz_loadu_epi8(0xFFFF, p);  // the last 32 inputs
      const __m512i nib = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(raw), shift), low4);
      const __m512i idx = _mm512_add_epi32(pattern, _mm512_set1_epi32(int(2 * c - b0)));
      for (int i = 0; i < MM; ++i) {
        const __m512i bias = _mm512_load_si512(L.lane_bias(ws, m0 + i) + 16 * c);
        const __m512i dot = _mm512_dpbusd_epi32(bias, nib, _mm512_load_si512(L.xq(ws, m0 + i) + 64 * c));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, scale[i]), acc[i]);
      }
    }
  }
  for (int i = 0; i < MM; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

#elif MFS_AVX2

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int MM>
void int8_row(const int8_t* w, const void*, DType, int64_t, int64_t K, const Layout& L, const uint8_t* ws,
              int64_t m0, float* y) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + BLOCK * b));
    const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as unsigned (-128 -> 128)
    for (int i = 0; i < MM; ++i) {
      const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(L.xq(ws, m0 + i) + BLOCK * b));
      // |w| * (x with w's sign) = w * x; pairs of products fit int16 (<= 2 * 128 * 127)
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, wv)), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(L.d(ws, m0 + i)[b]), acc[i]);
    }
  }
  for (int i = 0; i < MM; ++i) y[i] = hsum(acc[i]);
}

template <int MM>
void int4_row(const uint8_t* w, const void* s, DType st, int64_t per_group, int64_t K, const Layout& L,
              const uint8_t* ws, int64_t m0, float* y) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MM];
  float offset[MM];  // sum over blocks of scale * 8 * sum(x): the nibbles' -8
  for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps(), offset[i] = 0.f;
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + BLOCK / 2 * b));
    const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
    const __m256i nib = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);  // [even | odd inputs]
    const float sw = load_scalar(s, st, b / per_group);
    for (int i = 0; i < MM; ++i) {
      const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(L.xq(ws, m0 + i) + BLOCK * b));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, x), ones);  // <= 2 * 15 * 127 a pair
      const float scale = sw * L.d(ws, m0 + i)[b];
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc[i]);
      offset[i] += scale * float(8 * L.sx(ws, m0 + i)[b]);
    }
  }
  for (int i = 0; i < MM; ++i) y[i] = hsum(acc[i]) - offset[i];
}

#else

template <int MM>
void int8_row(const int8_t* w, const void*, DType, int64_t, int64_t K, const Layout& L, const uint8_t* ws,
              int64_t m0, float* y) {
  for (int i = 0; i < MM; ++i) {
    const int8_t* x = L.xq(ws, m0 + i);
    const float* d = L.d(ws, m0 + i);
    float sum = 0.f;
    for (int64_t b = 0; b < K / BLOCK; ++b) {
      int32_t dot = 0;
      for (int64_t k = b * BLOCK; k < (b + 1) * BLOCK; ++k) dot += int32_t(w[k]) * int32_t(x[k]);
      sum += d[b] * float(dot);
    }
    y[i] = sum;
  }
}

template <int MM>
void int4_row(const uint8_t* w, const void* s, DType st, int64_t per_group, int64_t K, const Layout& L,
              const uint8_t* ws, int64_t m0, float* y) {
  for (int i = 0; i < MM; ++i) {
    const int8_t* x = L.xq(ws, m0 + i);
    const float* d = L.d(ws, m0 + i);
    float sum = 0.f;
    for (int64_t b = 0; b < K / BLOCK; ++b) {
      int32_t dot = 0;
      for (int64_t j = b * BLOCK / 2; j < (b + 1) * BLOCK / 2; ++j)
        dot += (int32_t(w[j] & 15) - 8) * x[2 * j] + (int32_t(w[j] >> 4) - 8) * x[2 * j + 1];
      sum += load_scalar(s, st, b / per_group) * d[b] * float(dot);
    }
    y[i] = sum;
  }
}

#endif

template <typename W, void (*Row1)(const W*, const void*, DType, int64_t, int64_t, const Layout&, const uint8_t*, int64_t, float*),
          void (*Row2)(const W*, const void*, DType, int64_t, int64_t, const Layout&, const uint8_t*, int64_t, float*),
          void (*Row3)(const W*, const void*, DType, int64_t, int64_t, const Layout&, const uint8_t*, int64_t, float*),
          void (*Row4)(const W*, const void*, DType, int64_t, int64_t, const Layout&, const uint8_t*, int64_t, float*)>
void rows(const uint8_t* ws, int64_t M, int64_t K, const W* w, int64_t row_bytes, const void* scales, DType st,
          int64_t scales_per_row, int64_t per_group, bool row_scale, void* out, DType ot, int64_t N, int64_t n0,
          int64_t n1) {
  const Layout L(K);
  const int64_t scale_size = st == F32 ? 4 : 2;
  for (int64_t n = n0; n < n1; ++n) {
    const W* wn = reinterpret_cast<const W*>(reinterpret_cast<const uint8_t*>(w) + n * row_bytes);
    const void* sn = static_cast<const uint8_t*>(scales) + n * scales_per_row * scale_size;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MM) {
      float y[MAX_MM];
      switch (std::min<int64_t>(MAX_MM, M - m0)) {
        case 1: Row1(wn, sn, st, per_group, K, L, ws, m0, y); break;
        case 2: Row2(wn, sn, st, per_group, K, L, ws, m0, y); break;
        case 3: Row3(wn, sn, st, per_group, K, L, ws, m0, y); break;
        default: Row4(wn, sn, st, per_group, K, L, ws, m0, y); break;
      }
      const float s = row_scale ? load_scalar(sn, st, 0) : 1.f;
      for (int64_t i = 0; i < std::min<int64_t>(MAX_MM, M - m0); ++i) store_scalar(out, ot, (m0 + i) * N + n, y[i] * s);
    }
  }
}

}  // namespace

const char* isa() {
#if MFS_AVX512
  return "avx512-vnni";
#elif MFS_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

size_t workspace_bytes(int64_t M, int64_t K) { return size_t(M * Layout(K).stride); }

void prepare(Format format, const void* x, DType x_dtype, int64_t M, int64_t K, uint8_t* ws) {
  const Layout L(K);
  const int64_t size = x_dtype == F32 ? 4 : 2;
  for (int64_t m = 0; m < M; ++m)
    prepare_row(format, static_cast<const uint8_t*>(x) + m * K * size, x_dtype, K, L, ws, m);
}

void int8_rows(const uint8_t* ws, int64_t M, int64_t K, const int8_t* w, const void* scales, DType s_dtype,
               void* out, DType out_dtype, int64_t N, int64_t n0, int64_t n1) {
  rows<int8_t, int8_row<1>, int8_row<2>, int8_row<3>, int8_row<4>>(ws, M, K, w, K, scales, s_dtype, 1, 1, true, out,
                                                                    out_dtype, N, n0, n1);
}

void int4_rows(const uint8_t* ws, int64_t M, int64_t K, const uint8_t* w, const void* scales, DType s_dtype,
               int64_t group, void* out, DType out_dtype, int64_t N, int64_t n0, int64_t n1) {
  rows<uint8_t, int4_row<1>, int4_row<2>, int4_row<3>, int4_row<4>>(ws, M, K, w, K / 2, scales, s_dtype, K / group,
                                                                    group / BLOCK, false, out, out_dtype, N, n0, n1);
}

}  // namespace mfs

// For tests that build this file alone (one instruction set at a time) and call it through ctypes:
// the whole mat-vec on one thread.
extern "C" {
const char* mfs_isa() { return mfs::isa(); }
size_t mfs_workspace_bytes(int64_t M, int64_t K) { return mfs::workspace_bytes(M, K); }
void mfs_matvec(int format, const void* x, int dtype, int64_t M, int64_t K, const void* w, const void* scales,
                int64_t group, void* out, int64_t N, uint8_t* ws) {
  const auto t = mfs::DType(dtype);
  mfs::prepare(mfs::Format(format), x, t, M, K, ws);
  if (format == mfs::INT8)
    mfs::int8_rows(ws, M, K, static_cast<const int8_t*>(w), scales, t, out, t, N, 0, N);
  else
    mfs::int4_rows(ws, M, K, static_cast<const uint8_t*>(w), scales, t, group, out, t, N, 0, N);
}
}
