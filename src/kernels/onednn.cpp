#include "onednn.h"

#include <oneapi/dnnl/dnnl.hpp>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

#include "victor/error.h"

namespace victor::onednn {

namespace {

std::string key_of(const View& a, const View& b, const View& c, float alpha, bool bias, Act act) {
  std::string k;
  for (const View* v : {&a, &b, &c}) {
    for (int64_t d : v->dims) k += std::to_string(d) + ",";
    k += "/";
    for (int64_t s : v->strides) k += std::to_string(s) + ",";
    k += "|";
  }
  return k + std::to_string(alpha) + (bias ? "b" : "") + std::to_string(int(act));
}

void append_act(dnnl::post_ops& po, Act act) {
  using A = dnnl::algorithm;
  switch (act) {
    case Act::None: return;
    case Act::QuickGelu: po.append_eltwise(1.f, A::eltwise_swish, 1.702f, 0.f); return;  // x * sigmoid(1.702 x)
    case Act::Gelu: po.append_eltwise(1.f, A::eltwise_gelu_erf, 0.f, 0.f); return;
    case Act::GeluTanh: po.append_eltwise(1.f, A::eltwise_gelu_tanh, 0.f, 0.f); return;
    case Act::Silu: po.append_eltwise(1.f, A::eltwise_swish, 1.f, 0.f); return;
    case Act::Relu: po.append_eltwise(1.f, A::eltwise_relu, 0.f, 0.f); return;
  }
}

dnnl::memory::desc desc_of(const View& v, dnnl::memory::data_type t) {
  return dnnl::memory::desc(dnnl::memory::dims(v.dims.begin(), v.dims.end()), t,
                            dnnl::memory::dims(v.strides.begin(), v.strides.end()));
}

struct Cache {
  std::mutex mu;
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<std::string, dnnl::matmul> prims;
};

Cache& cache() {
  static Cache c;
  return c;
}

}  // namespace

bool bf16_fast() {
  static const bool fast = [] {
    try {
      using dt = dnnl::memory::data_type;
      const View a{{64, 64}, {64, 1}}, b{{64, 64}, {1, 64}}, c{{64, 64}, {64, 1}};
      dnnl::matmul::primitive_desc pd(
          dnnl::matmul::desc(desc_of(a, dt::bf16), desc_of(b, dt::bf16), desc_of(c, dt::f32)), cache().engine);
      return std::string(pd.impl_info_str()).rfind("ref", 0) != 0;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return fast;
}

void matmul_bf16_f32(const View& a, const uint16_t* ad, const View& b, const uint16_t* bd,
                     const View& c, float* cd, float alpha, const float* bias, Act act) {
  const size_t n = a.dims.size();
  if (n < 2 || b.dims.size() != n || c.dims.size() != n || a.strides.size() != n ||
      b.strides.size() != n || c.strides.size() != n || a.dims[n - 1] != b.dims[n - 2] ||
      c.dims[n - 2] != a.dims[n - 2] || c.dims[n - 1] != b.dims[n - 1])
    throw Error("onednn::matmul_bf16_f32: operand shapes do not match");
  using dt = dnnl::memory::data_type;
  Cache& C = cache();
  std::lock_guard<std::mutex> lock(C.mu);
  try {
    const std::string key = key_of(a, b, c, alpha, bias != nullptr, act);
    // The bias as a [1, ..., 1, N] row broadcast over everything else.
    std::vector<int64_t> bdims(n, 1), bstrides(n, 0);
    bdims[n - 1] = c.dims[n - 1];
    bstrides[n - 1] = 1;
    for (size_t i = n - 1; i-- > 0;) bstrides[i] = c.dims[n - 1];
    const View bv{bdims, bstrides};
    auto it = C.prims.find(key);
    if (it == C.prims.end()) {
      if (C.prims.size() >= 512) C.prims.clear();  // shapes follow request lengths: stay bounded
      dnnl::primitive_attr attr;
      if (alpha != 1.f) attr.set_output_scales(0, {alpha});
      dnnl::post_ops po;
      append_act(po, act);
      attr.set_post_ops(po);
      auto d = bias ? dnnl::matmul::desc(desc_of(a, dt::bf16), desc_of(b, dt::bf16), desc_of(bv, dt::f32), desc_of(c, dt::f32))
                    : dnnl::matmul::desc(desc_of(a, dt::bf16), desc_of(b, dt::bf16), desc_of(c, dt::f32));
      it = C.prims.emplace(key, dnnl::matmul(dnnl::matmul::primitive_desc(d, attr, C.engine))).first;
    }
    dnnl::memory ma(desc_of(a, dt::bf16), C.engine, const_cast<uint16_t*>(ad));
    dnnl::memory mb(desc_of(b, dt::bf16), C.engine, const_cast<uint16_t*>(bd));
    dnnl::memory mc(desc_of(c, dt::f32), C.engine, cd);
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}};
    if (bias) args.emplace(DNNL_ARG_BIAS, dnnl::memory(desc_of(bv, dt::f32), C.engine, const_cast<float*>(bias)));
    it->second.execute(C.stream, args);
    C.stream.wait();
  } catch (const dnnl::error& e) {
    throw Error(std::string("oneDNN matmul failed: ") + e.what());
  }
}

}  // namespace victor::onednn
