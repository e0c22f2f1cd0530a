// Mat-vec for fp32 / bf16 weights on the CPU (float_matvec.h), for the few rows of a decode step:
//
//   avx512   16 lanes; a bf16 weight becomes fp32 by a 16-bit shift (exact)
//   avx2     8 lanes, the same
//   scalar   portable C++; also the definition the others must match
//
// Every path multiplies and adds in fp32, as PyTorch's CPU mat-mul does for these dtypes; they
// differ from it and from each other only in the order of the sums.
#include "float_matvec.h"

#include "bf16.h"

#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MFS_F_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define MFS_F_AVX2 1
#include <immintrin.h>
#endif

namespace mfs {

namespace {

constexpr int MAX_MM = 4;  // activation rows computed together against one read of a weight row

#if MFS_F_AVX512

__m512 load16(const void* w, DType t, int64_t i) {
  if (t == F32) return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// y[i] = x[m0 + i] · w for MM rows of x (fp32, [M, K]) and one weight row w; K a multiple of 16 is
// the fast part. Each weight vector is loaded once for the MM rows of x; every pair takes the same
// instructions in the same order whatever MM. One weight row at a time, front to back, with no
// software prefetch: 4 rows at once with prefetch 8 KiB ahead streamed 1.1-2x slower on a 2-core
// AMD EPYC (one thread, weights 12x its L3), as in quant_matvec.cpp.
template <int MM>
void row(const float* x, int64_t K, const void* w, DType wt, int64_t m0, float* y) {
  __m512 acc[MM][2];
  for (int i = 0; i < MM; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = load16(w, wt, k), w1 = load16(w, wt, k + 16);
    for (int i = 0; i < MM; ++i) {
      const float* xi = x + (m0 + i) * K;
      acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xi + k), w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xi + k + 16), w1, acc[i][1]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 w0 = load16(w, wt, k);
    for (int i = 0; i < MM; ++i) acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (m0 + i) * K + k), w0, acc[i][0]);
  }
  for (int i = 0; i < MM; ++i) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
    for (int64_t j = k; j < K; ++j) s += x[(m0 + i) * K + j] * load_scalar(w, wt, j);
    y[i] = s;
  }
}

#elif MFS_F_AVX2

__m256 load8(const void* w, DType t, int64_t i) {
  if (t == F32) return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MM>
void row(const float* x, int64_t K, const void* w, DType wt, int64_t m0, float* y) {
  __m256 acc[MM][2];
  for (int i = 0; i < MM; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = load8(w, wt, k), w1 = load8(w, wt, k + 8);
    for (int i = 0; i < MM; ++i) {
      const float* xi = x + (m0 + i) * K;
      acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + k), w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + k + 8), w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MM; ++i) {
    float s = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
    for (int64_t j = k; j < K; ++j) s += x[(m0 + i) * K + j] * load_scalar(w, wt, j);
    y[i] = s;
  }
}

#else

template <int MM>
void row(const float* x, int64_t K, const void* w, DType wt, int64_t m0, float* y) {
  for (int i = 0; i < MM; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += x[(m0 + i) * K + k] * load_scalar(w, wt, k);
    y[i] = s;
  }
}

#endif

}  // namespace

const char* float_isa() {
#if MFS_F_AVX512
  return "avx512";
#elif MFS_F_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

void float_prepare(const void* x, DType x_dtype, int64_t M, int64_t K, float* xf) {
  for (int64_t i = 0; i < M * K; ++i)
    xf[i] = load_scalar(x, x_dtype, i);
}

void float_rows(const float* xf, int64_t M, int64_t K, const void* w, DType w_dtype, void* out, DType out_dtype,
                int64_t N, int64_t n0, int64_t n1) {
  const int64_t row_bytes = K * (w_dtype == F32 ? 4 : 2);
  for (int64_t n = n0; n < n1; ++n) {
    const void* wn = static_cast<const uint8_t*>(w) + n * row_bytes;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MM) {
      const int64_t mm = std::min<int64_t>(MAX_MM, M - m0);
      float y[MAX_MM];
      switch (mm) {
        case 1: row<1>(xf, K, wn, w_dtype, m0, y); break;
        case 2: row<2>(xf, K, wn, w_dtype, m0, y); break;
        case 3: row<3>(xf, K, wn, w_dtype, m0, y); break;
        default: row<4>(xf, K, wn, w_dtype, m0, y); break;
      }
      for (int64_t i = 0; i < mm; ++i) store_scalar(out, out_dtype, (m0 + i) * N + n, y[i]);
    }
  }
}

}  // namespace mfs

// For tests that build this file alone (one instruction set at a time) and call it through ctypes:
// the whole mat-vec on one thread; x, w and out all of `dtype`; xf: an [M, K] fp32 workspace.
extern "C" {
const char* mfs_float_isa() { return mfs::float_isa(); }
void mfs_float_matvec(const void* x, int dtype, int64_t M, int64_t K, const void* w, void* out, int64_t N, float* xf) {
  const auto t = mfs::DType(dtype);
  mfs::float_prepare(x, t, M, K, xf);
  mfs::float_rows(xf, M, K, w, t, out, t, N, 0, N);
}
}
