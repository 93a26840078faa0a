// libFuzzer: a SentencePiece tokenizer.model on arbitrary bytes, and the encoder on arbitrary text.
// Input: 2 bytes (little-endian) text length, the text, then the model's bytes. The model parses
// or is refused with a victor::Error naming it; a parsed model encodes any text into ids inside
// its vocabulary and decodes them back without failing.
#include <cstdlib>
#include <string>

#include "victor/error.h"
#include "victor/tokenizer.h"

using namespace victor;

#define CHECK(c) \
  if (!(c)) abort()

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  size_t n = size_t(data[0]) | (size_t(data[1]) << 8);
  data += 2, size -= 2;
  if (n > size) n = size;
  const std::string text(reinterpret_cast<const char*>(data), n);
  const std::string model(reinterpret_cast<const char*>(data + n), size - n);
  try {
    Tokenizer tok = Tokenizer::from_model_bytes(model, "fuzz/tokenizer.model");
    auto ids = tok.encode(text);
    for (auto id : ids) CHECK(id >= 0 && id < tok.vocab_size());
    (void)tok.decode(ids);
    CHECK(tok.encode("").empty());
  } catch (const Error& e) {
    CHECK(std::string(e.what()).rfind("fuzz/tokenizer.model", 0) == 0);
  }
  return 0;
}
