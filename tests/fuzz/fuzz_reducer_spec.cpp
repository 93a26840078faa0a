// libFuzzer: the --reducer spec parser. A spec parses or is refused with victor::Error; a parsed
// reducer's canonical spec parses back to the same reducer, and validating it against a model
// either passes or throws Error.
#include <cstdlib>
#include <string>

#include "victor/config.h"
#include "victor/error.h"
#include "victor/reducer.h"

using namespace victor;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string spec(reinterpret_cast<const char*>(data), size);
  static const ModelConfig small = preset_config("small");
  try {
    Reducer r = Reducer::parse(spec);
    if (Reducer::parse(r.spec()) != r) std::abort();
    (void)r.name();
    try {
      r.validate(small);
      (void)r.kv_rows(small, 40, 2, 16);
      (void)r.visual_rows(small);
    } catch (const Error&) {
    }
  } catch (const Error&) {
  }
  return 0;
}
