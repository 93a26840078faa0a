// SentencePiece tokenizer (our own reader of tokenizer.model: unigram and BPE models, byte
// fallback) plus the added tokens Hugging Face folders declare, and the LLaVA-1.5 template.
// Own code rather than libsentencepiece: that library bundles a protobuf that clashes with
// LibTorch's in one process.
#pragma once
#include <array>
#include <map>
#include <memory>
#include <unordered_map>
#include <string>
#include <vector>

namespace victor {

class Tokenizer {
 public:
  // tokenizer.model + added tokens. A model folder an interrupted write left incomplete is
  // refused unless `allow_incomplete` (a training run resuming from its own checkpoint).
  explicit Tokenizer(const std::string& dir, bool allow_incomplete = false);
  // tokenizer.model's bytes alone, no added tokens (`source` names it in errors; the fuzz target).
  static Tokenizer from_model_bytes(const std::string& bytes, const std::string& source);
  // The model plus the texts of added_tokens.json and tokenizer_config.json (either may be empty =
  // absent), each named by its source in errors: what Tokenizer(dir) reads, from memory.
  static Tokenizer from_bytes(const std::string& model, const std::string& model_source,
                              const std::string& added_tokens_json, const std::string& added_source,
                              const std::string& tokenizer_config_json, const std::string& config_source);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) = default;

  // Encodes text; added tokens ("<image>") found in it become their ids. No BOS.
  std::vector<int64_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int64_t>& ids) const;  // skips special tokens
  int64_t bos_id() const { return bos_; }
  int64_t eos_id() const { return eos_; }
  int64_t token_id(const std::string& added_token) const;  // throws if unknown
  int sp_size() const;
  int64_t vocab_size() const;  // including added tokens
  // The most bytes of text one token can stand for: a text longer than n times this cannot fit
  // in n tokens, so a request too long for the context is refused before it is tokenized.
  size_t max_bytes_per_token() const;

 private:
  struct Piece {
    std::string text;
    float score = 0;
    int type = 1;  // 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    int byte = -1;  // type 6: the byte "<0xAB>" stands for
  };
  Tokenizer() = default;
  void load_model(const std::string& bytes, const std::string& source);
  void load_added_tokens(const std::string& json_text, const std::string& source);
  void load_tokenizer_config(const std::string& json_text, const std::string& source);
  std::vector<int64_t> encode_piece_text(const std::string& text) const;
  std::vector<int64_t> encode_unigram(const std::string& norm) const;
  std::vector<int64_t> encode_bpe(const std::string& norm) const;
  void push_unknown(const std::string& chunk, std::vector<int64_t>& out) const;
  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int64_t> index_;
  std::map<std::string, int64_t> added_;
  int model_type_ = 1;  // 1 unigram, 2 BPE
  bool add_dummy_prefix_ = true, remove_extra_whitespaces_ = true, escape_whitespaces_ = true;
  bool byte_fallback_ = false;
  size_t max_piece_bytes_ = 1;
  bool words_independent_ = true;  // no piece holds "▁" after its first byte (encode by words)
  float min_score_ = 0;
  int64_t byte_ids_[256] = {};
  int64_t bos_ = 1, eos_ = 2, unk_ = 0;
};

// Trains a SentencePiece model (spm_train; `model_type` "bpe", as Llama's, or "unigram"; byte
// fallback, identity normalization) on `corpus_lines` and writes tokenizer.model,
// added_tokens.json and tokenizer_config.json into dir. Returns the SentencePiece vocabulary size.
// BPE keeps GridVQA's words whole ("▁column"), where unigram on so small a corpus splits them
// into letters and makes every question twice as long.
// Copies a tokenizer's files (tokenizer.model, added_tokens.json, tokenizer_config.json,
// special_tokens_map.json: those present) from one folder to another, each atomically.
void copy_tokenizer_files(const std::string& from, const std::string& to);
int train_tokenizer(const std::vector<std::string>& corpus_lines, const std::string& dir,
                    int vocab_size, const std::string& model_type = "bpe");

// A region of the image in coordinates normalized to its width and height: x0, y0, x1, y1.
using Box = std::array<float, 4>;

struct Turn {
  std::string human, assistant;
  // Grounding (optional, training only): the image regions the answer rests on, from the gpt turn's
  // "boxes" key. grounded with no boxes = the answer rests on nothing in the image ("0", "no").
  bool grounded = false;
  std::vector<Box> boxes{};
};

// A tokenized conversation: ids and, per id, whether it is an assistant token (trained on).
struct EncodedChat {
  std::vector<int64_t> ids;
  std::vector<uint8_t> is_target;
};

// LLaVA-1.5: "USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>".
// With an empty last assistant turn the result ends at "ASSISTANT:" (a generation prompt).
EncodedChat encode_chat(const Tokenizer& tok, const std::vector<Turn>& turns);
std::string chat_prompt_text(const std::vector<Turn>& turns);

}  // namespace victor
