#include "onednn.h"

#include <oneapi/dnnl/dnnl.hpp>

#include <map>
#include <mutex>
#include <string>

#include "victor/error.h"

namespace victor::onednn {

namespace {

std::string key_of(const View& a, const View& b, const View& c, float alpha) {
  std::string k;
  for (const View* v : {&a, &b, &c}) {
    for (int64_t d : v->dims) k += std::to_string(d) + ",";
    k += "/";
    for (int64_t s : v->strides) k += std::to_string(s) + ",";
    k += "|";
  }
  return k + std::to_string(alpha);
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

void matmul_bf16_f32(const View& a, const uint16_t* ad, const View& b, const uint16_t* bd,
                     const View& c, float* cd, float alpha) {
  const size_t n = a.dims.size();
  if (n < 2 || b.dims.size() != n || c.dims.size() != n || a.strides.size() != n ||
      b.strides.size() != n || c.strides.size() != n || a.dims[n - 1] != b.dims[n - 2] ||
      c.dims[n - 2] != a.dims[n - 2] || c.dims[n - 1] != b.dims[n - 1])
    throw Error("onednn::matmul_bf16_f32: operand shapes do not match");
  using dt = dnnl::memory::data_type;
  Cache& C = cache();
  std::lock_guard<std::mutex> lock(C.mu);
  try {
    const std::string key = key_of(a, b, c, alpha);
    auto it = C.prims.find(key);
    if (it == C.prims.end()) {
      if (C.prims.size() >= 512) C.prims.clear();  // shapes follow request lengths: stay bounded
      dnnl::primitive_attr attr;
      if (alpha != 1.f) attr.set_output_scales(0, {alpha});
      dnnl::matmul::desc d(desc_of(a, dt::bf16), desc_of(b, dt::bf16), desc_of(c, dt::f32));
      it = C.prims.emplace(key, dnnl::matmul(dnnl::matmul::primitive_desc(d, attr, C.engine))).first;
    }
    dnnl::memory ma(desc_of(a, dt::bf16), C.engine, const_cast<uint16_t*>(ad));
    dnnl::memory mb(desc_of(b, dt::bf16), C.engine, const_cast<uint16_t*>(bd));
    dnnl::memory mc(desc_of(c, dt::f32), C.engine, cd);
    it->second.execute(C.stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    C.stream.wait();
  } catch (const dnnl::error& e) {
    throw Error(std::string("oneDNN matmul failed: ") + e.what());
  }
}

}  // namespace victor::onednn
