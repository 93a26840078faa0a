// libFuzzer: LLaVA's training JSON (first byte even, with and without --skip-bad) and evaluation
// JSONL (odd). Samples or a victor::Error naming the file; a parsed conversation has human/gpt
// turns and at most one <image>, present exactly when it has an image; split_turns keeps that.
#include <cstdlib>
#include <string>
#include <vector>

#include "victor/error.h"
#include "victor/llava_data.h"

using namespace victor;

#define CHECK(c) \
  if (!(c)) abort()

namespace {

size_t placeholders(const Conversation& c) {
  size_t n = 0;
  for (auto& t : c.turns)
    for (size_t p = t.human.find("<image>"); p != std::string::npos; p = t.human.find("<image>", p + 1)) ++n;
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    if (mode & 1) {
      for (auto& q : parse_questions_jsonl(text, "fuzz.jsonl")) (void)q.question_id.dump();
      return 0;
    }
    std::vector<std::string> bad;
    auto convs = parse_llava_json(text, "fuzz.json", (mode & 2) ? &bad : nullptr);
    for (auto& c : convs) {
      CHECK(!c.turns.empty());
      CHECK(placeholders(c) == (c.image.empty() ? 0u : 1u));
    }
    for (auto& c : split_turns(convs)) {
      CHECK(c.turns.size() == 1);
      CHECK(placeholders(c) == (c.image.empty() ? 0u : 1u));
    }
    for (auto& b : bad) CHECK(b.rfind("fuzz.json", 0) == 0);
  } catch (const Error& e) {
    const std::string w = e.what();
    CHECK(w.rfind("fuzz.json", 0) == 0);
  }
  return 0;
}
