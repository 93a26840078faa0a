// libFuzzer: the added-token files of a Hugging Face tokenizer folder (added_tokens.json and
// tokenizer_config.json's added_tokens_decoder) on arbitrary bytes, over a fixed small
// SentencePiece model. Input: added_tokens.json's text, then optionally a NUL byte and
// tokenizer_config.json's text (an empty part = the file is absent). Either the folder loads, or a
// victor::Error names the file at fault. A loaded tokenizer encodes every added token to its id,
// keeps every id inside its vocabulary, and decodes without failing.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "victor/error.h"
#include "victor/tokenizer.h"

using namespace victor;

#define CHECK(c) \
  if (!(c)) abort()

namespace {

void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) out.push_back(char(0x80 | (v & 0x7f))), v >>= 7;
  out.push_back(char(v));
}

void bytes_field(std::string& out, int num, const std::string& payload) {
  varint(out, uint64_t(num) << 3 | 2);
  varint(out, payload.size());
  out += payload;
}

// A SentencePiece ModelProto with <unk>, <s>, </s> and four normal pieces and a TrainerSpec (unigram, scores -1..-4).
std::string small_model() {
  std::string model;
  const std::vector<std::pair<std::string, int>> pieces = {
      {"<unk>", 2}, {"<s>", 3}, {"</s>", 3}, {"\xe2\x96\x81" "a", 1}, {"b", 1}, {"\xe2\x96\x81", 1}, {"c", 1}};
  float score = 0;
  for (auto& [text, type] : pieces) {
    std::string p;
    bytes_field(p, 1, text);
    varint(p, 2 << 3 | 5);
    p.append(reinterpret_cast<const char*>(&score), 4);
    score -= 1;
    varint(p, 3 << 3 | 0);
    varint(p, uint64_t(type));
    bytes_field(model, 1, p);
  }
  std::string trainer;  // TrainerSpec: unigram, unk 0, bos 1, eos 2
  for (auto [num, v] : {std::pair<int, uint64_t>{3, 1}, {40, 0}, {41, 1}, {42, 2}}) {
    varint(trainer, uint64_t(num) << 3 | 0);
    varint(trainer, v);
  }
  bytes_field(model, 2, trainer);
  return model;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string model = small_model();
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string added = in.substr(0, nul);
  const std::string config = nul == std::string::npos ? std::string() : in.substr(nul + 1);
  try {
    Tokenizer tok = Tokenizer::from_bytes(model, "fuzz/tokenizer.model", added, "fuzz/added_tokens.json",
                                          config, "fuzz/tokenizer_config.json");
    CHECK(tok.vocab_size() >= tok.sp_size());
    for (const std::string& text : {std::string("a <image> b c"), added, config}) {
      auto ids = tok.encode(text);
      for (auto id : ids) CHECK(id >= 0 && id < tok.vocab_size());
      (void)tok.decode(ids);
    }
    if (config.empty() && !added.empty()) {
      // Loaded, so added_tokens.json was an object of ids: each token alone encodes to its id.
      auto j = nlohmann::json::parse(added);
      for (auto& [k, v] : j.items()) {
        CHECK(tok.token_id(k) == v.get<int64_t>());
        auto ids = tok.encode(k);
        CHECK(ids.size() == 1 && ids[0] == v.get<int64_t>());
      }
    }
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.rfind("fuzz/added_tokens.json", 0) != 0 && what.rfind("fuzz/tokenizer_config.json", 0) != 0) {
      fprintf(stderr, "error names no added-token file: %s\n", what.c_str());
      abort();
    }
  }
  return 0;
}
