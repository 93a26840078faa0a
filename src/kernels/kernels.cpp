#include "victor/kernels.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "isa_kernels.h"
#include "onednn.h"
#include "victor/error.h"

namespace victor {

namespace kernels {

static_assert(kQ8Block == kQ8BlockK, "victor/kernels.h and isa_kernels.h disagree on the int8 x int8 block");
static_assert(kInt4Group == kInt4GroupK, "victor/kernels.h and isa_kernels.h disagree on the int4 group");

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

std::vector<Isa> supported_isas() {
  __builtin_cpu_init();
  std::vector<Isa> out{Isa::Scalar};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(Isa::Avx2);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    out.push_back(Isa::Avx512);
    if (__builtin_cpu_supports("avx512bf16")) out.push_back(Isa::Avx512Bf16);
    if (__builtin_cpu_supports("avx512vnni")) out.push_back(Isa::Avx512Vnni);
  }
  return out;
}

namespace {

Isa initial_isa() {
  const auto all = supported_isas();
  // VICTOR_ISA=scalar|avx2|avx512|avx512vnni chooses the path (comparisons, or float32 activations
  // for batched int8 products); never one the CPU lacks.
  if (const char* env = std::getenv("VICTOR_ISA")) {
    for (Isa i : all)
      if (std::string(env) == isa_name(i)) return i;
  }
  // The best the CPU has. Where that is Avx512Vnni, batched int8 products (kQ8MinRows to
  // skinny_rows_limit() rows: batched decode) quantize their activations in 256-blocks, as
  // products of more rows already round theirs to bf16 (oneDNN); VICTOR_ISA=avx512bf16 keeps
  // them float32 at 1.5-2.7x the cost per 16-row product (notebook@f64a969, item 15).
  return all.back();
}

std::atomic<Isa>& current() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

const KernelSet& active_set() {
  switch (current().load(std::memory_order_relaxed)) {
    case Isa::Avx512Vnni: {
      // With the bf16 x bf16 products too where the CPU has them.
      static const KernelSet set = [] {
        KernelSet s = avx512vnni_kernels();
        if (__builtin_cpu_supports("avx512bf16")) {
          s.prepare_bf16_hilo = avx512bf16_kernels().prepare_bf16_hilo;
          s.matmul_bf16_hilo = avx512bf16_kernels().matmul_bf16_hilo;
        }
        return s;
      }();
      return set;
    }
    case Isa::Avx512Bf16: return avx512bf16_kernels();
    case Isa::Avx512: return avx512_kernels();
    case Isa::Avx2: return avx2_kernels();
    case Isa::Scalar: break;
  }
  return scalar_kernels();
}

}  // namespace

Isa active_isa() { return current().load(); }

void use_isa(Isa isa) {
  for (Isa i : supported_isas())
    if (i == isa) {
      current().store(isa);
      return;
    }
  throw Error(std::string("kernels: this CPU does not support the ") + isa_name(isa) + " path");
}

}  // namespace kernels

namespace {

using kernels::active_set;

// Rows of a stored weight and its int4 interleave: an int4 one tiled by 4 rows is [O/4, G/2, 4, 32],
// by 16 rows [O/16, G, 4, 64] (isa_kernels.h).
int64_t int4_interleave_of(const torch::Tensor& w) {
  return w.dim() != 4 ? 1 : w.size(3) == 4 * 16 ? 16 : 4;
}
int64_t weight_rows(const torch::Tensor& w) {
  return w.dim() == 4 && w.scalar_type() == torch::kUInt8 ? w.size(0) * int4_interleave_of(w) : w.size(0);
}

void check_weight(const torch::Tensor& w, const torch::Tensor& scale, int64_t K) {
  if ((w.dim() != 2 && !(w.dim() == 4 && w.scalar_type() == torch::kUInt8)) || !w.is_contiguous())
    throw Error("matmul_weight: weight must be a contiguous [out,in] matrix");
  if (w.scalar_type() == torch::kUInt8) {
    const int64_t O = weight_rows(w);
    const int64_t il = int4_interleave_of(w), G = int4_groups(K);
    const bool packed = il == 1    ? w.size(1) == int4_row_bytes(K)
                        : il == 4  ? w.size(1) * 2 == G && w.size(2) == 4 && w.size(3) == kInt4Group
                                   : w.size(1) == G && w.size(2) == 4;
    if (!packed)
      throw Error("matmul_weight: input has " + std::to_string(K) + " features, an int4 weight for it has " +
                  std::to_string(int4_row_bytes(K)) + " bytes a row (in rows or in tiles of 4 or 16), not " +
                  std::to_string(w.size(1)));
    const bool scale_ok = il == 16 ? scale.dim() == 3 && scale.size(0) * 16 == O && scale.size(1) == G && scale.size(2) == 16
                                   : scale.dim() == 2 && scale.size(0) == O && scale.size(1) == G;
    if (!scale.defined() || scale.scalar_type() != torch::kFloat16 || !scale_ok || !scale.is_contiguous())
      throw Error("matmul_weight: an int4 weight needs a float16 scale [rows, groups] (tiles of 16 rows: "
                  "[rows / 16, groups, 16])");
    return;
  }
  if (w.size(1) != K)
    throw Error("matmul_weight: input has " + std::to_string(K) + " features, weight expects " +
                std::to_string(w.size(1)));
  if (w.scalar_type() == torch::kInt8 &&
      (!scale.defined() || scale.scalar_type() != torch::kFloat32 || scale.numel() != w.size(0)))
    throw Error("matmul_weight: an int8 weight needs a float32 scale with one entry per row");
}

// Threads over [0,n) in chunks taken from a shared counter: a thread slowed down by a neighbour
// on the machine takes fewer chunks instead of holding the others at the barrier (static halves
// left one thread waiting ~40% of decode). f(a, b) gets each chunk; one thread runs f(0, n).
template <class F>
void over_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(std::max(1, at::get_num_threads()), chunks);
  if (threads <= 1) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Rows [o0, o1) of a 16-row-tiled int4 W (il = 16) for kernels that read rows: each tile they
// touch copied into the file layout (il = 1) with its scales [16, G], then f(rows, scales, lo, hi,
// base) with the tile's first row at `base` and the range [lo, hi) counted from it.
template <class F>
void int4_untiled(const uint8_t* w, const uint16_t* scale, int64_t K, int64_t o0, int64_t o1, const F& f) {
  const int64_t G = kernels::int4_groups(K), rb = kernels::int4_row_bytes(K);
  std::vector<uint8_t> rows(size_t(16 * rb));
  std::vector<uint16_t> sc(size_t(16 * G));
  for (int64_t ob = o0 / 16; ob * 16 < o1; ++ob) {
    const int64_t base = ob * 16;
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = 0; j < 4; ++j)
          std::memcpy(&rows[size_t(r * rb + g * 16 + 4 * j)], w + kernels::int4_tile16_offset(K, base + r, g, 4 * j), 4);
        sc[size_t(r * G + g)] = scale[kernels::int4_tile16_scale_index(G, base + r, g)];
      }
    f(rows.data(), sc.data(), std::max(o0, base) - base, std::min(o1, base + 16) - base, base);
  }
}

// Threads over output rows: about 8 chunks per thread, whole multiples of 16 rows.
template <class F>
void over_rows(int64_t O, const F& f) {
  const int64_t threads = std::max(1, at::get_num_threads());
  if (threads == 1 || O < 64) {
    f(0, O);
    return;
  }
  over_chunks(O, std::max<int64_t>(16, (O / (threads * 8) + 15) / 16 * 16), f);
}

// y_i = x2 W_i^T for every W_i (one storage, one K), in one pass over their rows: the activations
// are prepared once (bf16 pair split, int8 quantization) and the threads share one row counter.
std::vector<torch::Tensor> skinny(const torch::Tensor& x2, const std::vector<torch::Tensor>& ws,
                                  const std::vector<torch::Tensor>& scales) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const size_t n = ws.size();
  std::vector<torch::Tensor> ys(n);
  std::vector<int64_t> first(n + 1, 0);  // matrix i owns global rows [first[i], first[i+1])
  for (size_t i = 0; i < n; ++i) {
    ys[i] = torch::empty({M, weight_rows(ws[i])}, torch::kFloat32);
    first[i + 1] = first[i] + weight_rows(ws[i]);
  }
  const float* xp = x2.data_ptr<float>();
  const auto& ks = active_set();
  const auto type = ws[0].scalar_type();
  // Threads over the global rows; call(i, o0, o1, y, ldy) gets each chunk's share of matrix i.
  auto run = [&](const auto& call) {
    over_rows(first[n], [&](int64_t a, int64_t b) {
      for (size_t i = 0; i < n; ++i) {
        const int64_t lo = std::max(a, first[i]), hi = std::min(b, first[i + 1]);
        if (lo < hi) call(i, lo - first[i], hi - first[i], ys[i].data_ptr<float>(), weight_rows(ws[i]));
      }
    });
  };
  switch (type) {
    case torch::kFloat32:
      run([&](size_t i, int64_t o0, int64_t o1, float* y, int64_t ldy) {
        ks.matmul_f32(xp, M, K, ws[i].data_ptr<float>(), o0, o1, y, ldy);
      });
      break;
    case torch::kBFloat16: {
      if (ks.matmul_bf16_hilo) {  // the activations split into bf16 hi and lo halves once, here
        // 64-byte aligned (LibTorch's allocator), and rows of a multiple of 32 values: no
        // activation load straddles two cache lines.
        auto xhl_t = torch::empty({M * 2 * kernels::bf16_hilo_padded(K)}, torch::kInt16);
        auto* xhl = reinterpret_cast<uint16_t*>(xhl_t.data_ptr<int16_t>());
        ks.prepare_bf16_hilo(xp, M, K, xhl);
        run([&](size_t i, int64_t o0, int64_t o1, float* y, int64_t ldy) {
          ks.matmul_bf16_hilo(xhl, M, K, reinterpret_cast<const uint16_t*>(ws[i].data_ptr<at::BFloat16>()), o0,
                              o1, y, ldy);
        });
        break;
      }
      torch::Tensor split;
      const float* xs = xp;
      if (ks.bf16_pair_split) {
        // [M,K] -> [M, 2, ceil(K/2)]: even elements, then odd ones (zero-padded).
        auto padded = K % 2 ? torch::constant_pad_nd(x2, {0, 1}) : x2;
        split = padded.view({M, (K + 1) / 2, 2}).transpose(1, 2).contiguous();
        xs = split.data_ptr<float>();
      }
      run([&](size_t i, int64_t o0, int64_t o1, float* y, int64_t ldy) {
        ks.matmul_bf16(xs, M, K, reinterpret_cast<const uint16_t*>(ws[i].data_ptr<at::BFloat16>()), o0, o1, y, ldy);
      });
      break;
    }
    case torch::kInt8: {
      // int8 x int8 (VNNI) from kernels::kQ8MinRows rows: there it computes 1.25-2.7x faster than
      // widening the weights; below, a row is bound by streaming the weights and the activations'
      // quantization only adds (1 row 48 vs 58 GB/s, 4 rows 33 vs 39; notebook@f64a969 item 15).
      if (ks.matmul_int8_q8 && M >= kernels::kQ8MinRows) {  // the activations quantized once, here
        // 64-byte aligned (LibTorch's allocator) with rows of a multiple of 64 bytes: no activation
        // load straddles two cache lines. A std::vector's 16-byte alignment let loads split, which
        // cost up to 1.6x (notebook@f64a969 item 17).
        const int64_t Kp = kernels::q8_padded(K);
        auto xq_t = torch::empty({M * Kp}, torch::kUInt8);
        uint8_t* xq = xq_t.data_ptr<uint8_t>();
        std::vector<float> xs(size_t(M * kernels::q8_scales(K)));
        ks.quantize_q8(xp, M, K, xq, xs.data());
        run([&](size_t i, int64_t o0, int64_t o1, float* y, int64_t ldy) {
          ks.matmul_int8_q8(xq, xs.data(), M, K, ws[i].data_ptr<int8_t>(), scales[i].data_ptr<float>(), o0,
                            o1, y, ldy);
        });
        break;
      }
      run([&](size_t i, int64_t o0, int64_t o1, float* y, int64_t ldy) {
        ks.matmul_int8(xp, M, K, ws[i].data_ptr<int8_t>(), scales[i].data_ptr<float>(), o0, o1, y, ldy);
      });
      break;
    }
    case torch::kUInt8: {  // int4: the activations quantized in 32-blocks once, here
      const int64_t G = kernels::int4_groups(K);
      auto xq_t = torch::empty({M * kernels::int4_padded(K)}, torch::kInt8);
      auto xs_t = torch::empty({2 * M * G}, torch::kFloat32);
      int8_t* xq = xq_t.data_ptr<int8_t>();
      float* xd = xs_t.data_ptr<float>();
      float* xc = xd + M * G;
      ks.quantize_q8_32(xp, M, K, xq, xd, xc);
      run([&](size_t i, int64_t o0, int64_t o1, float* y, int64_t ldy) {
        const uint8_t* w = ws[i].data_ptr<uint8_t>();
        const auto* sc = reinterpret_cast<const uint16_t*>(scales[i].data_ptr<at::Half>());
        const int64_t il = int4_interleave_of(ws[i]);
        if (il != 16 || ks.int4_tiles16) return ks.matmul_int4(xq, xd, xc, M, K, w, il, sc, o0, o1, y, ldy);
        int4_untiled(w, sc, K, o0, o1, [&](const uint8_t* bw, const uint16_t* bs, int64_t lo, int64_t hi, int64_t base) {
          ks.matmul_int4(xq, xd, xc, M, K, bw, 1, bs, lo, hi, y + base, ldy);
        });
      });
      break;
    }
    default: throw Error("matmul_weight: unsupported weight dtype");
  }
  return ys;
}

// An int4 W [O, K] as float32, rows on the kernels' threads.
torch::Tensor int4_to_f32(const torch::Tensor& q, const torch::Tensor& scale, int64_t K) {
  const int64_t O = weight_rows(q), il = int4_interleave_of(q);
  auto out = torch::empty({O, K}, torch::kFloat32);
  const auto& ks = active_set();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  over_rows(O, [&](int64_t a, int64_t b) {
    if (il != 16) return ks.dequant_int4_f32(qp, il, sp, K, a, b, op + a * K);
    int4_untiled(qp, sp, K, a, b, [&](const uint8_t* bw, const uint16_t* bs, int64_t lo, int64_t hi, int64_t base) {
      ks.dequant_int4_f32(bw, 1, bs, K, lo, hi, op + (base + lo) * K);
    });
  });
  return out;
}

// An int4 W [O, K] as bf16, rows on the kernels' threads: in one pass where the kernels have one
// (BM_MatmulWeight int4 at 64 rows: 5.4 ms through float32, 2.8 ms this way, as int8 does).
torch::Tensor int4_to_bf16(const torch::Tensor& q, const torch::Tensor& scale, int64_t K) {
  const auto& ks = active_set();
  if (!ks.dequant_int4_bf16) return int4_to_f32(q, scale, K).to(torch::kBFloat16);
  const int64_t O = weight_rows(q), il = int4_interleave_of(q);
  auto out = torch::empty({O, K}, torch::kBFloat16);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  over_rows(O, [&](int64_t a, int64_t b) { ks.dequant_int4_bf16(qp, il, sp, K, a, b, op); });
  return out;
}

torch::Tensor int8_to_bf16(const torch::Tensor& q, const torch::Tensor& scale) {
  const int64_t O = q.size(0), K = q.size(1);
  auto out = torch::empty({O, K}, torch::kBFloat16);
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const auto& ks = active_set();
  over_rows(O, [&](int64_t a, int64_t b) { ks.dequant_int8_bf16(qp, sp, K, a, b, op); });
  return out;
}

}  // namespace

namespace {
// A bf16 tensor's storage as the raw bits oneDNN and the kernels take.
const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
std::atomic<int64_t> g_skinny_rows{16};
std::atomic<int64_t> g_attention_block{0};
}  // namespace

void set_attention_block_rows(int64_t rows) { g_attention_block.store(std::max<int64_t>(0, rows)); }

namespace {
// c = alpha * a @ b on bf16 operands with float32 accumulation: oneDNN's bf16 GEMM where the CPU
// has one (AVX-512), else LibTorch in float32 on the same bf16 values (an AVX2-only CPU, where
// oneDNN 2.6 builds no bf16 matmul at all: same products, slower).
void matmul_bf16_any(const onednn::View& a, const uint16_t* ad, const onednn::View& b, const uint16_t* bd,
                     const onednn::View& c, float* cd, float alpha) {
  if (onednn::bf16_fast()) return onednn::matmul_bf16_f32(a, ad, b, bd, c, cd, alpha);
  auto view = [](const onednn::View& v, const void* d, torch::ScalarType t) {
    return torch::from_blob(const_cast<void*>(d), v.dims, v.strides, torch::TensorOptions().dtype(t));
  };
  auto x = view(a, ad, torch::kBFloat16).to(torch::kFloat32), y = view(b, bd, torch::kBFloat16).to(torch::kFloat32);
  auto out = view(c, cd, torch::kFloat32);
  auto r = torch::matmul(x, y);
  if (alpha != 1.f) r.mul_(alpha);
  out.copy_(r);
}
}  // namespace

torch::Tensor attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& allowed) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || k.sizes() != v.sizes() || k.size(0) != q.size(0) ||
      k.size(3) != q.size(3) || k.size(1) <= 0 || q.size(1) % k.size(1) != 0)
    throw Error("attention_bf16: expected q [B,H,T,hd] and k, v [B,Hkv,S,hd] with H a multiple of Hkv");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  if (allowed.defined() && allowed.sizes() != torch::IntArrayRef{B, T, S})
    throw Error("attention_bf16: allowed must be [B,T,S]");
  auto out = torch::empty({B, H, T, hd}, torch::kFloat32);
  if (out.numel() == 0) return out;
  // bf16 copies keep the inputs' strides (a transposed view stays one); the last dim must be dense.
  auto bf16 = [](const torch::Tensor& t) {
    auto b = t.to(torch::kBFloat16);
    return b.stride(3) == 1 ? b : b.contiguous();
  };
  const auto qb = bf16(q), kb = bf16(k), vb = bf16(v);
  const auto al = allowed.defined() ? allowed.to(torch::kUInt8).contiguous() : torch::Tensor();
  int64_t tb = g_attention_block.load();
  if (tb <= 0) tb = std::max<int64_t>(1, (int64_t(48) << 20) / (H * S * 6));
  tb = std::min(tb, T);
  auto scores = torch::empty({H * tb * S}, torch::kFloat32);
  auto probs = torch::empty({H * tb * S}, torch::kBFloat16);
  float* sp = scores.data_ptr<float>();
  auto* pp = reinterpret_cast<uint16_t*>(probs.data_ptr<at::BFloat16>());
  const float scale = float(1.0 / std::sqrt(double(hd)));
  const auto& ks = active_set();
  using onednn::View;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
      const int64_t n = std::min(tb, T - t0);
      // Scores [Hkv, G, n, S]: query head h = j * G + g against KV head j (broadcast over g).
      const View qv{{Hkv, G, n, hd}, {G * qb.stride(1), qb.stride(1), qb.stride(2), 1}};
      const View kv{{Hkv, 1, hd, S}, {kb.stride(1), kb.stride(1), 1, kb.stride(2)}};
      const View sv{{Hkv, G, n, S}, {G * n * S, n * S, S, 1}};
      matmul_bf16_any(qv, bits(qb) + b * qb.stride(0) + t0 * qb.stride(2), kv, bits(kb) + b * kb.stride(0), sv, sp,
                      scale);
      const uint8_t* arow = al.defined() ? al.data_ptr<uint8_t>() + (b * T + t0) * S : nullptr;
      const int64_t rows = H * n;
      over_chunks(rows, std::max<int64_t>(1, rows / (8 * std::max(1, at::get_num_threads()))),
                  [&](int64_t r0, int64_t r1) {
                    for (int64_t r = r0; r < r1; ++r)
                      ks.softmax_bf16(sp + r * S, arow ? arow + (r % n) * S : nullptr, S, pp + r * S);
                  });
      // Output [Hkv, G, n, hd] written in place into out[b, :, t0:t0+n, :].
      const View pv{{Hkv, G, n, S}, {G * n * S, n * S, S, 1}};
      const View vv{{Hkv, 1, S, hd}, {vb.stride(1), vb.stride(1), vb.stride(2), 1}};
      const View ov{{Hkv, G, n, hd}, {G * T * hd, T * hd, hd, 1}};
      matmul_bf16_any(pv, pp, vv, bits(vb) + b * vb.stride(0), ov, out.data_ptr<float>() + b * H * T * hd + t0 * hd,
                      1.f);
    }
  }
  return out;
}

int64_t skinny_rows_limit() { return g_skinny_rows.load(std::memory_order_relaxed); }
void set_skinny_rows_limit(int64_t rows) { g_skinny_rows.store(std::max<int64_t>(0, rows)); }

Int4Matrix quantize_int4(const torch::Tensor& w_in) {
  if (w_in.dim() != 2) throw Error("quantize_int4: expected a matrix");
  const int64_t O = w_in.size(0), K = w_in.size(1), G = int4_groups(K);
  auto w = torch::constant_pad_nd(w_in.detach().to(torch::kFloat32), {0, G * kInt4Group - K}).view({O, G, kInt4Group});
  // The value of largest magnitude, with its sign: d = m / -8 maps it to -8 exactly and the rest
  // into [-8, 8] (8 itself, only for -m, clamps to 7).
  auto m = w.gather(2, w.abs().argmax(2, /*keepdim=*/true));  // [O,G,1]
  auto d16 = (m / -8.0).to(torch::kFloat16);
  auto d = d16.to(torch::kFloat32);
  auto id = torch::where(d.ne(0), torch::reciprocal(d), torch::zeros_like(d));
  auto n = (torch::round(w * id) + 8).clamp(0, 15).to(torch::kUInt8);  // [O,G,32]
  auto lo = n.narrow(2, 0, kInt4Group / 2), hi = n.narrow(2, kInt4Group / 2, kInt4Group / 2);
  auto packed = lo.bitwise_or(hi.bitwise_left_shift(4)).reshape({O, G * kInt4Group / 2}).contiguous();
  return {packed, d16.view({O, G}).contiguous()};
}

torch::Tensor int4_interleave(const torch::Tensor& q, int64_t K) {
  if (q.dim() != 2 || q.scalar_type() != torch::kUInt8) return q;
  const int64_t O = q.size(0), G = int4_groups(K);
  if (O % 4 != 0 || G % 2 != 0 || q.size(1) != int4_row_bytes(K)) return q;
  return q.view({O / 4, 4, G / 2, kInt4Group}).permute({0, 2, 1, 3}).contiguous();
}

bool int4_tile16(torch::Tensor& q, torch::Tensor& scale, int64_t K) {
  if (q.dim() != 2 || q.scalar_type() != torch::kUInt8 || scale.dim() != 2) return false;
  const int64_t O = q.size(0), G = int4_groups(K);
  if (O % 16 != 0 || q.size(1) != int4_row_bytes(K) || scale.size(0) != O || scale.size(1) != G) return false;
  // [O/16, 16 rows, G, 4 chunks, 4 bytes] -> [O/16, G, 4 chunks, 16 rows, 4 bytes]
  q = q.view({O / 16, 16, G, 4, 4}).permute({0, 2, 3, 1, 4}).contiguous().view({O / 16, G, 4, 64});
  scale = scale.view({O / 16, 16, G}).permute({0, 2, 1}).contiguous();
  return true;
}

void int4_tile_for_kernels(torch::Tensor& q, torch::Tensor& scale, int64_t K) {
  if (q.dim() != 2 || q.scalar_type() != torch::kUInt8) return;
  if (active_set().int4_tiles16 && int4_tile16(q, scale, K)) return;
  q = int4_interleave(q, K);
}

torch::Tensor int4_file_layout(const torch::Tensor& q) {
  if (q.dim() != 4 || q.scalar_type() != torch::kUInt8) return q;
  if (int4_interleave_of(q) == 16) {  // [O/16, G, 4 chunks, 16 rows, 4 bytes] -> rows
    const int64_t T = q.size(0), G = q.size(1);
    return q.view({T, G, 4, 16, 4}).permute({0, 3, 1, 2, 4}).reshape({T * 16, G * 16}).contiguous();
  }
  const int64_t O = q.size(0) * 4, rb = q.size(1) * kInt4Group;
  return q.permute({0, 2, 1, 3}).reshape({O, rb}).contiguous();
}

torch::Tensor int4_scale_file_layout(const torch::Tensor& scale) {
  if (scale.dim() != 3 || scale.scalar_type() != torch::kFloat16) return scale;
  return scale.permute({0, 2, 1}).reshape({scale.size(0) * scale.size(2), scale.size(1)}).contiguous();
}

torch::Tensor dequantize_int4(const torch::Tensor& q_in, const torch::Tensor& scale_in, int64_t K, torch::ScalarType out) {
  const torch::Tensor q = int4_file_layout(q_in);
  const torch::Tensor scale = int4_scale_file_layout(scale_in);
  const int64_t O = q.size(0), G = int4_groups(K);
  if (q.dim() != 2 || q.size(1) != int4_row_bytes(K) || scale.dim() != 2 || scale.size(0) != O || scale.size(1) != G)
    throw Error("dequantize_int4: packed [" + std::to_string(q.size(0)) + "," + std::to_string(q.size(-1)) +
                "] with scale of " + std::to_string(scale.numel()) + " entries is not an int4 matrix of " +
                std::to_string(K) + " columns");
  auto b = q.view({O, G, kInt4Group / 2});
  auto n = torch::cat({b.bitwise_and(15), b.bitwise_right_shift(4)}, 2).to(torch::kFloat32) - 8;  // [O,G,32]
  auto f = (n * scale.to(torch::kFloat32).unsqueeze(2)).view({O, G * kInt4Group}).narrow(1, 0, K);
  return f.to(out).contiguous();
}

torch::Tensor weight_as_float(const torch::Tensor& w, const torch::Tensor& scale, int64_t K) {
  if (w.scalar_type() == torch::kUInt8) return dequantize_int4(w, scale, K);
  if (w.scalar_type() == torch::kInt8) return dequantize_int8(w, scale);
  return w.to(torch::kFloat32);
}

Int8Matrix quantize_int8(const torch::Tensor& w_in) {
  if (w_in.dim() != 2) throw Error("quantize_int8: expected a matrix");
  auto w = w_in.detach().to(torch::kFloat32);
  auto amax = w.abs().amax(1);  // [O]
  auto scale = (amax / 127.0).clamp_min(1e-30);
  auto q = torch::round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch::kInt8).contiguous();
  // An all-zero row keeps scale 0 (exact), never a denormal that decodes to garbage.
  scale = torch::where(amax.gt(0), scale, torch::zeros_like(scale)).contiguous();
  return {q, scale};
}

torch::Tensor dequantize_int8(const torch::Tensor& q, const torch::Tensor& scale,
                              torch::ScalarType out) {
  auto f = q.to(torch::kFloat32) * scale.to(torch::kFloat32).unsqueeze(1);
  return f.to(out);
}

namespace {

// x2 [M,K] float32 times a bf16 or int8 W [O,K] (int8 expanded to bf16 first) in oneDNN's bf16
// GEMM: x rounded to bf16, float32 accumulation and output; bias and act applied to the float32
// result inside the primitive.
torch::Tensor gemm_bf16(const torch::Tensor& x2, const torch::Tensor& w, const torch::Tensor& scale,
                        const torch::Tensor& bias, onednn::Act act) {
  const int64_t M = x2.size(0), K = x2.size(1), O = weight_rows(w);
  const auto xb = x2.to(torch::kBFloat16).contiguous();
  const auto wb = w.scalar_type() == torch::kInt8    ? int8_to_bf16(w, scale)
                  : w.scalar_type() == torch::kUInt8 ? int4_to_bf16(w, scale, K)
                                                     : w.contiguous();
  const auto b = bias.defined() ? bias.contiguous() : bias;
  auto y = torch::empty({M, O}, torch::kFloat32);
  if (M == 0) return y;
  onednn::matmul_bf16_f32({{M, K}, {K, 1}}, bits(xb), {{K, O}, {1, K}}, bits(wb), {{M, O}, {O, 1}},
                          y.data_ptr<float>(), 1.f, b.defined() ? b.data_ptr<float>() : nullptr, act);
  return y;
}

}  // namespace

torch::Tensor matmul_weight(const torch::Tensor& x, const torch::Tensor& w,
                            const torch::Tensor& scale) {
  const int64_t K = x.size(-1);
  check_weight(w, scale, K);
  auto x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  auto shape = x.sizes().vec();
  shape.back() = weight_rows(w);
  torch::Tensor y;
  if (M <= skinny_rows_limit()) {
    y = skinny(x2.to(torch::kFloat32).contiguous(), {w}, {scale})[0];
  } else if (w.scalar_type() == torch::kFloat32) {
    y = at::mm(x2, w.t());
  } else if (takes_bf16_gemm(w, M)) {
    y = gemm_bf16(x2, w, scale, torch::Tensor(), onednn::Act::None);
  } else {
    // No bf16 GEMM on this CPU (oneDNN 2.6 builds none without AVX-512, and LibTorch's own bf16
    // mm runs on one core at a fraction of the speed: a 7B int8 prefill of 3,000 rows took
    // minutes per layer group on an AVX2 EPYC): the weight widened to float32 for the BLAS's
    // threaded sgemm. The widening reads the weight once; the product reads it M times.
    auto wf = w.scalar_type() == torch::kInt8    ? dequantize_int8(w, scale, torch::kFloat32)
              : w.scalar_type() == torch::kUInt8 ? int4_to_f32(w, scale, K)
                                                 : w.to(torch::kFloat32);
    y = at::mm(x2.to(torch::kFloat32), wf.t());
  }
  return y.reshape(shape);
}

namespace {
std::atomic<bool> g_bf16_gemm_off{false};
}  // namespace

bool bf16_gemm_available() { return !g_bf16_gemm_off.load() && onednn::bf16_fast(); }
void force_bf16_gemm_off(bool off) { g_bf16_gemm_off.store(off); }

bool takes_bf16_gemm(const torch::Tensor& w, int64_t rows) {
  return w.scalar_type() != torch::kFloat32 && rows > skinny_rows_limit() && bf16_gemm_available();
}

torch::Tensor matmul_weight_fused(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                  const torch::Tensor& bias, const std::string& act) {
  static const std::pair<const char*, onednn::Act> acts[] = {
      {"", onednn::Act::None},           {"quick_gelu", onednn::Act::QuickGelu},
      {"gelu", onednn::Act::Gelu},       {"gelu_pytorch_tanh", onednn::Act::GeluTanh},
      {"silu", onednn::Act::Silu},       {"relu", onednn::Act::Relu}};
  const onednn::Act* kind = nullptr;
  for (const auto& a : acts)
    if (act == a.first) kind = &a.second;
  const int64_t K = x.size(-1);
  if (!kind || !takes_bf16_gemm(w, x.numel() / std::max<int64_t>(1, K)) ||
      (bias.defined() && (bias.scalar_type() != torch::kFloat32 || bias.numel() != weight_rows(w))))
    return torch::Tensor();
  check_weight(w, scale, K);
  auto shape = x.sizes().vec();
  shape.back() = weight_rows(w);
  return gemm_bf16(x.reshape({-1, K}), w, scale, bias, *kind).reshape(shape);
}

std::vector<torch::Tensor> matmul_weights(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                          const std::vector<torch::Tensor>& scales) {
  if (ws.empty() || scales.size() != ws.size())
    throw Error("matmul_weights: needs one scale (possibly undefined) per weight");
  const int64_t K = x.size(-1);
  for (size_t i = 0; i < ws.size(); ++i) {
    check_weight(ws[i], scales[i], K);
    if (ws[i].scalar_type() != ws[0].scalar_type()) throw Error("matmul_weights: the weights differ in storage");
  }
  auto x2 = x.reshape({-1, K});
  std::vector<torch::Tensor> ys;
  if (x2.size(0) > skinny_rows_limit()) {
    for (size_t i = 0; i < ws.size(); ++i) ys.push_back(matmul_weight(x, ws[i], scales[i]));
    return ys;
  }
  ys = skinny(x2.to(torch::kFloat32).contiguous(), ws, scales);
  for (size_t i = 0; i < ws.size(); ++i) {
    auto shape = x.sizes().vec();
    shape.back() = weight_rows(ws[i]);
    ys[i] = ys[i].reshape(shape);
  }
  return ys;
}

// Weights are packed one after another into shared chunks of 2 MiB-aligned memory advised for
// huge pages. A chunk of its own per matrix, rounded up to whole 2 MiB pages, left on average
// 1 MiB a matrix resident for nothing: clip-l-1b in int8 held ~155 MiB more than its weights
// (peak RSS 1.22x llama.cpp's Q8_0). A chunk is freed with the last tensor in it.
struct HugePageArena::Chunk {
  char* base = nullptr;
  size_t size = 0, used = 0;
  ~Chunk() { std::free(base); }
};

torch::Tensor HugePageArena::copy(const torch::Tensor& t) {
  constexpr size_t kHuge = size_t(2) << 20, kChunk = size_t(64) << 20;
  const size_t bytes = size_t(t.numel()) * t.element_size();
  if (bytes < kHuge / 2 || !t.is_contiguous()) return t;
  const size_t need = (bytes + 63) / 64 * 64;  // the next tensor starts on a cache line
  std::shared_ptr<Chunk> chunk;
  char* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (current_ && current_.use_count() == 1) current_->used = 0;  // its tensors are gone
    if (!current_ || current_->size - current_->used < need) {
      auto c = std::make_shared<Chunk>();
      c->size = std::max(kChunk, (need + kHuge - 1) / kHuge * kHuge);
      void* m = nullptr;
      if (posix_memalign(&m, kHuge, c->size) != 0) return t;
      c->base = static_cast<char*>(m);
      madvise(m, c->size, MADV_HUGEPAGE);  // advisory: without THP the copy still works
      current_ = c;
    }
    chunk = current_;
    p = chunk->base + chunk->used;
    chunk->used += need;
  }
  std::memcpy(p, t.data_ptr(), bytes);
  return torch::from_blob(p, t.sizes(), [chunk](void*) mutable { chunk.reset(); }, t.options());
}

torch::Tensor in_huge_pages(const torch::Tensor& t) {
  static HugePageArena* arena = new HugePageArena;  // never destroyed: tensors may outlive main
  return arena->copy(t);
}

void attend_decode(const float* q, int64_t B, int64_t H, int64_t Hkv, int64_t hd, bool bf16_kv,
                   const DecodeKv* rows, float* out) {
  if (Hkv <= 0 || H % Hkv != 0) throw Error("attend_decode: query heads must be a multiple of the KV heads");
  const int64_t G = H / Hkv, tasks = B * Hkv;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  const auto& ks = active_set();
  // One task per (row, KV head), each thread with its own scratch.
  over_chunks(tasks, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv;
      const DecodeKv& r = rows[b];
      scratch.resize(size_t(G * r.len + hd));
      const float* qh = q + (b * H + h * G) * hd;
      float* oh = out + (b * H + h * G) * hd;
      const int64_t off = h * r.head_stride;
      if (bf16_kv)
        ks.attend_bf16(qh, G, hd, static_cast<const uint16_t*>(r.k) + off, static_cast<const uint16_t*>(r.v) + off,
                       r.len, r.allowed, scale, scratch.data(), oh);
      else
        ks.attend_f32(qh, G, hd, static_cast<const float*>(r.k) + off, static_cast<const float*>(r.v) + off, r.len,
                      r.allowed, scale, scratch.data(), oh);
    }
  });
}

torch::Tensor embedding_rows(const torch::Tensor& table, const torch::Tensor& scale,
                             const torch::Tensor& ids, int64_t K) {
  auto flat = ids.reshape({-1});
  if (table.scalar_type() == torch::kUInt8) {
    auto shape = ids.sizes().vec();
    shape.push_back(K);
    return dequantize_int4(torch::index_select(int4_file_layout(table), 0, flat), torch::index_select(scale, 0, flat), K)
        .view(shape);
  }
  auto rows = torch::index_select(table, 0, flat).to(torch::kFloat32);
  if (table.scalar_type() == torch::kInt8) rows.mul_(torch::index_select(scale, 0, flat).unsqueeze(1));
  auto shape = ids.sizes().vec();
  shape.push_back(table.size(1));
  return rows.view(shape);
}

}  // namespace victor
