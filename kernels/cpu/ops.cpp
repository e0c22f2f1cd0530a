// quant_matvec.h as PyTorch operators, so that a compiled graph calls them as single opaque ops:
//
//   mistral_cpu::int8_matvec(Tensor x, Tensor weight, Tensor scales) -> Tensor
//   mistral_cpu::int4_matvec(Tensor x, Tensor weight, Tensor scales, int group_size) -> Tensor
//   mistral_cpu::matvec(Tensor x, Tensor weight) -> Tensor          (fp32 / bf16 weights, float_matvec.h)
//   mistral_cpu::decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, int window,
//                                 Tensor? block_table=None) -> Tensor   (decode_attention.h)
//
// x [..., K] fp32 or bf16; the result [..., N] in x's dtype. The activation is quantized once, then
// output channels are split across PyTorch's intra-op threads (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "float_matvec.h"
#include "quant_matvec.h"

namespace {

mfs::DType dtype_of(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return mfs::F32;
  if (t.scalar_type() == at::kBFloat16) return mfs::BF16;
  TORCH_CHECK_VALUE(false, name, " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor matvec(mfs::Format format, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                  int64_t group) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  check_cpu_contiguous(scales, "scales");
  const mfs::DType xt = dtype_of(x, "x"), st = dtype_of(scales, "scales");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have an input dimension");
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1), N = weight.size(0);
  TORCH_CHECK_VALUE(K % 32 == 0 && K > 0, "the input dimension K = ", K, " must be a positive multiple of 32 ",
                    "(activations are quantized in blocks of 32)");
  if (format == mfs::INT8) {
    TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar, "weight must be int8, got ", weight.scalar_type());
    TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == K, "weight has shape ", weight.sizes(),
                      ", expected [N, ", K, "]");
    TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == N, "scales has shape ", scales.sizes(),
                      ", expected [", N, "]");
  } else {
    TORCH_CHECK_VALUE(group % 32 == 0 && group > 0 && 512 % group == 0 && K % group == 0, "group_size ", group,
                      " must be 32, 64, 128, 256 or 512 and divide K = ", K);
    TORCH_CHECK_VALUE(weight.scalar_type() == at::kByte, "weight must be uint8 (two int4 a byte), got ",
                      weight.scalar_type());
    TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == K / 2, "weight has shape ", weight.sizes(),
                      ", expected [N, ", K / 2, "]");
    TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group, "scales has shape ",
                      scales.sizes(), ", expected [", N, ", ", K / group, "]");
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || N == 0) return out;

  at::Tensor ws = at::empty({int64_t(mfs::workspace_bytes(M, K))}, x.options().dtype(at::kByte));  // 64-aligned
  uint8_t* w = ws.data_ptr<uint8_t>();
  mfs::prepare(format, x.data_ptr(), xt, M, K, w);
  // at least ~64 KiB of weights a task: smaller ones cost more to hand out than to compute
  const int64_t row_bytes = format == mfs::INT8 ? K : K / 2;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (format == mfs::INT8)
      mfs::int8_rows(w, M, K, weight.data_ptr<int8_t>(), scales.data_ptr(), st, out.data_ptr(), xt, N, n0, n1);
    else
      mfs::int4_rows(w, M, K, weight.data_ptr<uint8_t>(), scales.data_ptr(), st, group, out.data_ptr(), xt, N, n0, n1);
  });
  return out;
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  return matvec(mfs::INT8, x, weight, scales, 0);
}

at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group_size) {
  return matvec(mfs::INT4, x, weight, scales, group_size);
}

at::Tensor float_matvec(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  const mfs::DType xt = dtype_of(x, "x"), wt = dtype_of(weight, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty input dimension");
  const int64_t K = x.size(-1), M = x.numel() / K, N = weight.size(0);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == K, "weight has shape ", weight.sizes(), ", expected [N, ",
                    K, "]");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor xf = at::empty({M, K}, x.options().dtype(at::kFloat));
  mfs::float_prepare(x.data_ptr(), xt, M, K, xf.data_ptr<float>());
  const int64_t row_bytes = K * weight.element_size();
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    mfs::float_rows(xf.data_ptr<float>(), M, K, weight.data_ptr(), wt, out.data_ptr(), xt, N, n0, n1);
  });
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            int64_t window, const std::optional<at::Tensor>& block_table) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&pos, "pos"}}) check_cpu_contiguous(*t, name);
  const mfs::DType qt = dtype_of(q, "q"), kt = dtype_of(k, "k");
  TORCH_CHECK_VALUE(k.device().is_cpu() && v.device().is_cpu(), "k and v must be on the CPU, got ", k.device(),
                    " and ", v.device());
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), "v must have k's dtype ", k.scalar_type(), ", got ",
                    v.scalar_type());
  const bool paged = block_table.has_value();
  const char* layout = paged ? "[num_blocks, block_size, Hkv, D] (with block_table)" : "[B, Hkv, L, D]";
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, "q must be [B, T, H, D] and k ", layout, ", got ", q.sizes(),
                    " and ", k.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Hkv = paged ? k.size(2) : k.size(1);
  TORCH_CHECK_VALUE((paged || k.size(0) == B) && k.size(3) == D && v.sizes() == k.sizes(), "k and v must be ", layout,
                    " with B = ", B, " and D = ", D, ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.stride(3) == 1 && v.strides() == k.strides(), "k and v must have the same strides, ",
                    "contiguous along D; got ", k.strides(), " and ", v.strides());
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "H = ", H, " must be a multiple of Hkv = ", Hkv);
  TORCH_CHECK_VALUE(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == B, "pos must be int64 [", B,
                    "], got ", pos.scalar_type(), " ", pos.sizes());
  TORCH_CHECK_VALUE(window >= 0, "window must be >= 0 (0: none), got ", window);
  mfs::KVRows rows{};
  if (paged) {
    const at::Tensor& table = *block_table;
    check_cpu_contiguous(table, "block_table");
    TORCH_CHECK_VALUE(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == B,
                      "block_table must be int64 [", B, ", n], got ", table.scalar_type(), " ", table.sizes());
    TORCH_CHECK_VALUE(k.is_contiguous(), "a paged k must be contiguous");
    const int64_t bs = k.size(1), n = table.size(1), blocks = k.size(0);
    rows = {k.stride(0), k.stride(1), k.stride(2), table.data_ptr<int64_t>(), n, bs, n * bs};
    // every block a row will read must be in the pool
    const int64_t* p = pos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t last = std::min<int64_t>(p[b] + T, n * bs);  // positions [0, last) at most
      for (int64_t i = 0; i * bs < last; ++i) {
        const int64_t block = rows.table[b * n + i];
        TORCH_CHECK_VALUE(block >= 0 && block < blocks, "block_table[", b, ", ", i, "] = ", block,
                          " is not a block of the pool (", blocks, " blocks)");
      }
    }
  } else {
    rows = {k.stride(0), k.stride(2), k.stride(1), nullptr, 0, 0, k.size(2)};
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  // a group is ~4 * T * H / Hkv * L * D flops: hand out threads only when each gets enough of them
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, 4 * T * (H / Hkv) * rows.L * D));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t g0, int64_t g1) {
    mfs::decode_attention(q.data_ptr(), qt, k.data_ptr(), v.data_ptr(), kt, rows, pos.data_ptr<int64_t>(), T, H, Hkv,
                          D, window, out.data_ptr(), qt, g0, g1);
  });
  return out;
}

std::string isa() { return mfs::isa(); }

}  // namespace

TORCH_LIBRARY(mistral_cpu, m) {
  m.def("int8_matvec(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_matvec(Tensor x, Tensor weight, Tensor scales, int group_size) -> Tensor");
  m.def("matvec(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, int window, Tensor? block_table=None) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(mistral_cpu, CPU, m) {
  m.impl("int8_matvec", &int8_matvec);
  m.impl("int4_matvec", &int4_matvec);
  m.impl("matvec", &float_matvec);
  m.impl("decode_attention", &decode_attention);
}
