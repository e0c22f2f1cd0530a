// The kernels of quant_matvec.h, for the instruction set the compiler targets (-march=native):
//
//   avx512-vnni  vpdpbusd (u8 x s8 -> s32, four products a lane), the weights' sign handled by a
//                per-lane bias the accumulator starts from (see `prepare_row`); int8 64 inputs a
//                step, int4 128 (one 64-byte load of nibbles, the high ones split off by GFNI's
//                affine byte map where the CPU has it); one weight row at a time, front to back,
//                against up to 4 activation rows
//   avx2         32 inputs (one block) a step: vpmaddubsw + vpmaddwd
//   scalar       portable C++; also the definition the others must match
//
// Every path computes the same integer dot product of each block exactly, so they differ only in
// the order of the fp32 sums across blocks.
#include "quant_matvec.h"

#include "bf16.h"

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

// A tile is inlined into the loop over weight rows: called once a row, it cost int4 ~15% of its speed.
#define MFS_TILE [[gnu::always_inline]] inline

constexpr int64_t BLOCK = 32;  // inputs per activation scale
constexpr int MAX_MM = 4;      // activation rows computed together against one load of a weight row

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Workspace of one activation row (all offsets 64-byte aligned):
//   xq    [Kp] int8         the quantized inputs, zero past K (Kp: K rounded up to 128); order:
//                           natural, or permuted for int4
//   d     [nbp] float       block scales, zero past the last block
//   sx    [nbp] int32       sum of xq over each block (avx2 int4: the -8 of the nibbles)
//   lane_d    [Kp/4] float  avx512 int8: the block scale of each int32 lane of a 64-input step
//   lane_bias [Kp/4] int32  avx512: what each lane's dot product starts from (the sign correction),
//                           per 64-input step (int8) or 128-input chunk (int4)
struct Layout {
  int64_t Kp, nbp, stride;
  explicit Layout(int64_t K) : Kp(round_up(K, 128)), nbp(round_up(Kp / BLOCK, 16)), stride(3 * Kp + 8 * nbp) {}
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

// One row, as vpdpbusd's signed operand, with what each of its 16 int32 lanes starts from.
//   int8: 64-input steps (two blocks, or one at the end when K % 64 == 32) in natural order; the
//         weights are made unsigned by w + 128, so a lane starts at -128 * (the sum of its 4
//         inputs) and ends at the signed dot product. lane_d: each lane's block scale.
//   int4: 128-input chunks (four blocks, the last one partial), laid out as the kernel unpacks a
//         chunk's 64 bytes of nibbles with one mask and one shift of the whole vector: the chunk's
//         64 even inputs (the low nibbles), then its 64 odd ones (the high nibbles). Lane l of
//         either half then holds inputs of block l / 4 of the chunk, so both halves' products add
//         into the same lanes; a lane starts at -8 * (the sum of its 8 inputs), the nibbles' offset.
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
  if (format == INT8) {
    for (int64_t c = 0; c < round_up(K, 64) / 64; ++c) {
      const int64_t b = 2 * c;
      __m512i q[4];
      quantize_block16x2(x, t, 64 * c, q[0], q[1], d[b], sx[b]);
      if (64 * c + 32 < K) {
        quantize_block16x2(x, t, 64 * c + 32, q[2], q[3], d[b + 1], sx[b + 1]);
      } else {
        q[2] = q[3] = _mm512_setzero_si512();
      }
      __m128i* out = reinterpret_cast<__m128i*>(xq + 64 * c);
      for (int i = 0; i < 4; ++i) _mm_store_si128(out + i, _mm512_cvtsepi32_epi8(q[i]));
      // the lane sums of the stored order, by the same instruction the kernel uses
      const __m512i lane_sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                                   _mm512_load_si512(reinterpret_cast<const void*>(xq + 64 * c)));
      _mm512_store_si512(lane_bias + 16 * c, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(lane_sum, 7)));
      _mm512_store_ps(lane_d + 16 * c, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d[b]), _mm512_set1_ps(d[b + 1])));
    }
    return;
  }
  for (int64_t c = 0; c < round_up(K, 128) / 128; ++c) {
    __m128i* out = reinterpret_cast<__m128i*>(xq + 128 * c);
    for (int b = 0; b < 4; ++b) {
      __m512i q0 = _mm512_setzero_si512(), q1 = q0;
      if (128 * c + 32 * b < K) quantize_block16x2(x, t, 128 * c + 32 * b, q0, q1, d[4 * c + b], sx[4 * c + b]);
      _mm_store_si128(out + b, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q0, even, q1)));
      _mm_store_si128(out + 4 + b, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q0, odd, q1)));
    }
    const __m512i lo = _mm512_load_si512(reinterpret_cast<const void*>(xq + 128 * c));
    const __m512i hi = _mm512_load_si512(reinterpret_cast<const void*>(xq + 128 * c + 64));
    const __m512i lane_sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo), ones, hi);
    _mm512_store_si512(lane_bias + 16 * c, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(lane_sum, 3)));
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

// --- the dot products of one weight row with MM activation rows ---------------------------------
//
// A tile writes y[i] = sum over blocks of (activation scale * weight scale * integer dot) for the
// weight row w and activation rows m0 .. m0+MM-1; int8's per-channel scale is applied by the
// caller. Each weight vector is loaded once for the MM activation rows; every (weight row,
// activation row) pair takes the same instructions in the same order whatever MM, so a result's
// bits do not depend on the tile that computed it (a row decodes alike alone and in a batch).
//
// A weight row is read front to back, and the rows one after another: a single sequential stream,
// which the hardware prefetcher follows best. Reading 4 rows at once with software prefetch 8 KiB
// ahead streamed 1.3-2x slower on a 2-core AMD EPYC VM (one thread, weights 12x its L3; see
// BENCHMARKS.md, "CPU kernels: one weight row at a time").

#if MFS_AVX512

template <int MM>
MFS_TILE void int8_tile(const int8_t* w, const void*, DType, int64_t, int64_t K, const Layout& L, const uint8_t* ws,
               int64_t m0, float* y) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));  // w + 128: vpdpbusd's unsigned operand
  const int8_t* xq[MM];
  const int32_t* bias[MM];
  const float* lane_d[MM];
  for (int i = 0; i < MM; ++i)
    xq[i] = L.xq(ws, m0 + i), bias[i] = L.lane_bias(ws, m0 + i), lane_d[i] = L.lane_d(ws, m0 + i);
  __m512 acc[2][MM];  // two chains a row: even and odd steps
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < MM; ++i) acc[j][i] = _mm512_setzero_ps();
  auto step = [&](int64_t c, __m512i raw, int j) {  // inputs 64c .. 64c+63
    const __m512i wv = _mm512_xor_si512(raw, flip);
    for (int i = 0; i < MM; ++i) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_load_si512(bias[i] + 16 * c), wv,
                                              _mm512_load_si512(xq[i] + 64 * c));
      acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(lane_d[i] + 16 * c), acc[j][i]);
    }
  };
  const int64_t full = K / 64;
  int64_t c = 0;
  for (; c + 2 <= full; c += 2) {
    step(c, _mm512_loadu_si512(w + 64 * c), 0);
    step(c + 1, _mm512_loadu_si512(w + 64 * c + 64), 1);
  }
  if (c < full) step(c, _mm512_loadu_si512(w + 64 * c), 0);
  if (K % 64) step(full, _mm512_maskz_loadu_epi8(0xFFFFFFFFull, w + 64 * full), 1);  // the last 32
  for (int i = 0; i < MM; ++i) y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
}

// int4 spends more instructions a byte than int8, so the core runs fewer bytes ahead of its loads:
// prefetching 3 KiB ahead in the stream (into the next rows) streamed 1.2x faster on AMD EPYC
// (weights 12x L3, one thread); int8 did not gain from it (1-8 KiB).
constexpr int64_t INT4_PREFETCH = 3072;

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

// The high nibbles of every byte, in one instruction where GFNI is there: an affine map whose
// matrix moves bits 4..7 of a byte to bits 0..3.
inline __m512i high_nibbles(__m512i raw, __m512i low4) {
#if defined(__GFNI__)
  (void)low4;
  return _mm512_gf2p8affine_epi64_epi8(raw, _mm512_set1_epi64(0x1020408000000000ll), 0);
#else
  return _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
#endif
}

template <int MM>
MFS_TILE void int4_tile(const uint8_t* w, const void* s, DType st, int64_t per_group, int64_t K, const Layout& L,
               const uint8_t* ws, int64_t m0, float* y) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // lane l of chunk c holds inputs of block 4c + l / 4 (see prepare_row): its scale's index in a
  // window of 16 blocks, for each of the window's 4 chunks
  const __m512i pattern = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i window[4] = {pattern, _mm512_add_epi32(pattern, _mm512_set1_epi32(4)),
                             _mm512_add_epi32(pattern, _mm512_set1_epi32(8)),
                             _mm512_add_epi32(pattern, _mm512_set1_epi32(12))};
  const int64_t blocks = K / BLOCK, groups = blocks / per_group, chunks = round_up(K, 128) / 128;
  const int8_t* xq[MM];
  const int32_t* bias[MM];
  const float* d[MM];
  for (int i = 0; i < MM; ++i) xq[i] = L.xq(ws, m0 + i), bias[i] = L.lane_bias(ws, m0 + i), d[i] = L.d(ws, m0 + i);
  __m512 acc[2][MM];  // two chains a row: even and odd chunks
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < MM; ++i) acc[j][i] = _mm512_setzero_ps();
  __m512 scale[MM];  // activation scale x weight scale, per block of the window
  auto chunk = [&](int64_t c, __m512i raw, int win) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 64 * c + INT4_PREFETCH), _MM_HINT_T0);
    const __m512i lo = _mm512_and_si512(raw, low4), hi = high_nibbles(raw, low4);
    const int j = int(c & 1);
    for (int i = 0; i < MM; ++i) {
      const __m512i dot = _mm512_dpbusd_epi32(
          _mm512_dpbusd_epi32(_mm512_load_si512(bias[i] + 16 * c), lo, _mm512_load_si512(xq[i] + 128 * c)), hi,
          _mm512_load_si512(xq[i] + 128 * c + 64));
      acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(window[win], scale[i]), acc[j][i]);
    }
  };
  const int64_t full = K / 128;  // chunks of 64 whole bytes: a window of 4 of them is unrolled
  for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
    const __m512 sw = block_scales16(s, st, b0, groups, per_group);
    for (int i = 0; i < MM; ++i) scale[i] = _mm512_mul_ps(sw, _mm512_load_ps(d[i] + b0));
    const int64_t c0 = b0 / 4;
    if (c0 + 4 <= full) {
      chunk(c0, _mm512_loadu_si512(w + 64 * c0), 0);
      chunk(c0 + 1, _mm512_loadu_si512(w + 64 * c0 + 64), 1);
      chunk(c0 + 2, _mm512_loadu_si512(w + 64 * c0 + 128), 2);
      chunk(c0 + 3, _mm512_loadu_si512(w + 64 * c0 + 192), 3);
      continue;
    }
    for (int64_t c = c0; c < std::min(chunks, c0 + 4); ++c) {
      const int64_t bytes = std::min<int64_t>(64, K / 2 - 64 * c);  // 16, 32 or 48 in a last, partial chunk
      chunk(c, bytes == 64 ? _mm512_loadu_si512(w + 64 * c) : _mm512_maskz_loadu_epi8(~0ull >> (64 - bytes), w + 64 * c),
            int(c - c0));
    }
  }
  for (int i = 0; i < MM; ++i) y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
}

#elif MFS_AVX2

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int MM>
MFS_TILE void int8_tile(const int8_t* w, const void*, DType, int64_t, int64_t K, const Layout& L, const uint8_t* ws,
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
MFS_TILE void int4_tile(const uint8_t* w, const void* s, DType st, int64_t per_group, int64_t K, const Layout& L,
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
MFS_TILE void int8_tile(const int8_t* w, const void*, DType, int64_t, int64_t K, const Layout& L, const uint8_t* ws,
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
MFS_TILE void int4_tile(const uint8_t* w, const void* s, DType st, int64_t per_group, int64_t K, const Layout& L,
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

// The tiles of a format, as function pointers: Tile::fn<MM>.
struct Int8Tile {
  static constexpr bool row_scale = true;  // times the row's scale (int4's scales are inside the tile)
  template <int MM>
  static constexpr auto fn = &int8_tile<MM>;
};

struct Int4Tile {
  static constexpr bool row_scale = false;
  template <int MM>
  static constexpr auto fn = &int4_tile<MM>;
};

// Outputs [n0, n1) for activation rows m0 .. m0+MM-1, one weight row after another.
template <typename Tile, int MM, typename W>
void rows_mm(const uint8_t* ws, int64_t m0, int64_t K, const W* w, int64_t row_bytes,
             const void* scales, DType st, int64_t s_row_bytes, int64_t per_group, void* out, DType ot,
             int64_t N, int64_t n0, int64_t n1) {
  const Layout L(K);
  for (int64_t n = n0; n < n1; ++n) {
    const void* s = static_cast<const uint8_t*>(scales) + n * s_row_bytes;
    float y[MM];
    Tile::template fn<MM>(w + n * row_bytes, s, st, per_group, K, L, ws, m0, y);
    const float rs = Tile::row_scale ? load_scalar(s, st, 0) : 1.f;
    for (int i = 0; i < MM; ++i) store_scalar(out, ot, (m0 + i) * N + n, Tile::row_scale ? y[i] * rs : y[i]);
  }
}

// Outputs [n0, n1); activation rows MAX_MM at a time against each weight row, sharing each weight
// load among them: one pass over the weight rows for up to MAX_MM activation rows, and for more,
// every activation row against a weight row before the next one (it is then in L1).
template <typename Tile, typename W>
void rows(const uint8_t* ws, int64_t M, int64_t K, const W* w, int64_t row_bytes, const void* scales, DType st,
          int64_t s_row_bytes, int64_t per_group, void* out, DType ot, int64_t N, int64_t n0,
          int64_t n1) {
  const auto pass = [&](int64_t mm, int64_t m0, int64_t a, int64_t b) {
    switch (mm) {
      case 1: return rows_mm<Tile, 1>(ws, m0, K, w, row_bytes, scales, st, s_row_bytes, per_group, out, ot, N, a, b);
      case 2: return rows_mm<Tile, 2>(ws, m0, K, w, row_bytes, scales, st, s_row_bytes, per_group, out, ot, N, a, b);
      case 3: return rows_mm<Tile, 3>(ws, m0, K, w, row_bytes, scales, st, s_row_bytes, per_group, out, ot, N, a, b);
      default: return rows_mm<Tile, 4>(ws, m0, K, w, row_bytes, scales, st, s_row_bytes, per_group, out, ot, N, a, b);
    }
  };
  if (M <= MAX_MM) return pass(M, 0, n0, n1);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MM) pass(std::min<int64_t>(MAX_MM, M - m0), m0, n, n + 1);
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
  rows<Int8Tile>(ws, M, K, w, K, scales, s_dtype, s_dtype == F32 ? 4 : 2, 1, out, out_dtype, N, n0, n1);
}

void int4_rows(const uint8_t* ws, int64_t M, int64_t K, const uint8_t* w, const void* scales, DType s_dtype,
               int64_t group, void* out, DType out_dtype, int64_t N, int64_t n0, int64_t n1) {
  rows<Int4Tile>(ws, M, K, w, K / 2, scales, s_dtype, K / group * (s_dtype == F32 ? 4 : 2), group / BLOCK, out,
                 out_dtype, N, n0, n1);
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
