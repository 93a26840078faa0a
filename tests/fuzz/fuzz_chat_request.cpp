// libFuzzer: the chat-completions request parser on arbitrary bodies. It must either return a
// request or throw ApiError (a 4xx with a field), never crash, hang or throw anything else; what
// it returns must be consistent (one <image> per image, text of the last turn to generate).
#include <cstdlib>
#include <string>

#include "victor/serve/api.h"

using namespace victor;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  ServeLimits lim;
  lim.max_image_bytes = 1 << 16;
  try {
    ChatRequest r = parse_chat_request(body, lim);
    size_t placeholders = 0;
    for (auto& t : r.turns)
      for (size_t p = t.human.find("<image>"); p != std::string::npos; p = t.human.find("<image>", p + 1))
        ++placeholders;
    if (placeholders != r.images.size() || r.turns.empty() || !r.turns.back().assistant.empty()) std::abort();
    if (r.max_tokens && (*r.max_tokens < 1 || *r.max_tokens > lim.max_tokens)) std::abort();
    if (!(r.temperature >= 0 && r.temperature <= 2) || !(r.top_p >= 0 && r.top_p <= 1)) std::abort();
    for (auto& img : r.images)
      if (int64_t(img.bytes.size()) > lim.max_image_bytes) std::abort();
  } catch (const ApiError& e) {
    if (e.status < 400 || e.status > 499) std::abort();
    (void)error_body(e);
  }
  // base64 and UTF-8 repair on the same bytes: decode(encode(x)) == x; repaired text is
  // unchanged by a second repair.
  if (base64_decode(base64_encode(body), "fuzz") != body) std::abort();
  const std::string clean = sanitize_utf8(body);
  if (sanitize_utf8(clean) != clean) std::abort();
  return 0;
}
