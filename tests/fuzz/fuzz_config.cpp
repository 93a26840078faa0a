// libFuzzer: config.json (and the reducer keys inside it), and preprocessor_config.json, on arbitrary bytes. Either a model
// config or a victor::Error naming the source, nothing else.
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "victor/config.h"
#include "victor/error.h"

using namespace victor;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    ModelConfig c = config_from_json(j, "fuzz/config.json");
    try {
      c.validate();
    } catch (const Error&) {
    }
    (void)config_to_json(c).dump();
  } catch (const Error&) {
  }
  // The same bytes as preprocessor_config.json, applied to a valid config.
  try {
    ModelConfig c = preset_config("tiny");
    apply_preprocess_json(c, j, "fuzz/preprocessor_config.json");
    try {
      c.validate();
    } catch (const Error&) {
    }
  } catch (const Error&) {
  }
  return 0;
}
