#include "victor/tokenizer.h"

#include <cstring>

#include <cstdlib>
#include <filesystem>
#include <limits>
#include <queue>
#include <sstream>
#include <nlohmann/json.hpp>

#include "victor/error.h"
#include "victor/files.h"
#include "victor/process.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

namespace {

const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's visible space

// Minimal protobuf wire-format reader: enough for sentencepiece_model.proto.
struct Wire {
  const uint8_t* p;
  const uint8_t* end;
  std::string src;
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) throw Error(src + ": truncated SentencePiece model");
      uint8_t b = *p++;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    throw Error(src + ": corrupt SentencePiece model (bad varint)");
  }
  // Reads the next field; returns false at the end. `sub` is set for length-delimited fields.
  bool field(int& number, int& wire, uint64_t& value, Wire& sub) {
    if (p >= end) return false;
    uint64_t key = varint();
    number = int(key >> 3);
    wire = int(key & 7);
    switch (wire) {
      case 0: value = varint(); break;
      case 1:
        if (end - p < 8) throw Error(src + ": truncated SentencePiece model");
        std::memcpy(&value, p, 8);
        p += 8;
        break;
      case 2: {
        uint64_t n = varint();
        if (uint64_t(end - p) < n) throw Error(src + ": truncated SentencePiece model");
        sub = Wire{p, p + n, src};
        p += n;
        break;
      }
      case 5: {
        if (end - p < 4) throw Error(src + ": truncated SentencePiece model");
        uint32_t v;
        std::memcpy(&v, p, 4);
        value = v;
        p += 4;
        break;
      }
      default: throw Error(src + ": corrupt SentencePiece model (wire type " + std::to_string(wire) + ")");
    }
    return true;
  }
};

size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 6) return 2;
  if ((c >> 4) == 14) return 3;
  if ((c >> 3) == 30) return 4;
  return 1;
}

}  // namespace

Tokenizer Tokenizer::from_model_bytes(const std::string& bytes, const std::string& source) {
  Tokenizer t;
  t.load_model(bytes, source);
  return t;
}

Tokenizer Tokenizer::from_bytes(const std::string& model, const std::string& model_source,
                                const std::string& added_tokens_json, const std::string& added_source,
                                const std::string& tokenizer_config_json, const std::string& config_source) {
  Tokenizer t;
  t.load_model(model, model_source);
  if (!added_tokens_json.empty()) t.load_added_tokens(added_tokens_json, added_source);
  if (!tokenizer_config_json.empty()) t.load_tokenizer_config(tokenizer_config_json, config_source);
  return t;
}

namespace {

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

}  // namespace

void Tokenizer::load_model(const std::string& bytes, const std::string& source) {
  Wire w{reinterpret_cast<const uint8_t*>(bytes.data()),
         reinterpret_cast<const uint8_t*>(bytes.data()) + bytes.size(), source};
  int num, wire;
  uint64_t val;
  Wire sub{nullptr, nullptr, source};
  std::string normalizer_name, charsmap;
  bool seen_trainer = false;
  while (w.field(num, wire, val, sub)) {
    if (num == 1 && wire == 2) {  // SentencePiece
      Piece piece;
      int n2, w2;
      uint64_t v2;
      Wire s2{nullptr, nullptr, source};
      while (sub.field(n2, w2, v2, s2)) {
        if (n2 == 1 && w2 == 2) piece.text.assign(reinterpret_cast<const char*>(s2.p), s2.end - s2.p);
        else if (n2 == 2 && w2 == 5) std::memcpy(&piece.score, &v2, 4);
        else if (n2 == 3 && w2 == 0) piece.type = int(v2);
      }
      pieces_.push_back(std::move(piece));
    } else if (num == 2 && wire == 2) {  // TrainerSpec
      seen_trainer = true;
      int n2, w2;
      uint64_t v2;
      Wire s2{nullptr, nullptr, source};
      while (sub.field(n2, w2, v2, s2)) {
        if (n2 == 3 && w2 == 0) model_type_ = int(v2);
        else if (n2 == 35 && w2 == 0) byte_fallback_ = v2 != 0;
        else if (n2 == 41 && w2 == 0) bos_ = int64_t(int32_t(v2));
        else if (n2 == 42 && w2 == 0) eos_ = int64_t(int32_t(v2));
        else if (n2 == 40 && w2 == 0) unk_ = int64_t(int32_t(v2));
      }
    } else if (num == 3 && wire == 2) {  // NormalizerSpec
      int n2, w2;
      uint64_t v2;
      Wire s2{nullptr, nullptr, source};
      while (sub.field(n2, w2, v2, s2)) {
        if (n2 == 1 && w2 == 2) normalizer_name.assign(reinterpret_cast<const char*>(s2.p), s2.end - s2.p);
        else if (n2 == 2 && w2 == 2) charsmap.assign(reinterpret_cast<const char*>(s2.p), s2.end - s2.p);
        else if (n2 == 3 && w2 == 0) add_dummy_prefix_ = v2 != 0;
        else if (n2 == 4 && w2 == 0) remove_extra_whitespaces_ = v2 != 0;
        else if (n2 == 5 && w2 == 0) escape_whitespaces_ = v2 != 0;
      }
    }
  }
  if (pieces_.empty() || !seen_trainer)
    throw Error(source + ": not a SentencePiece model (no pieces)");
  if (model_type_ != 1 && model_type_ != 2)
    throw Error(source + ": SentencePiece model type " + std::to_string(model_type_) +
                " is not supported (unigram or BPE)");
  // A normalizer rewrites text before it is split (NFKC and the like): victor implements only the
  // identity (LLaMA's), so another would silently give other ids than the model was trained on.
  if (!charsmap.empty() || !(normalizer_name.empty() || normalizer_name == "identity"))
    throw Error(source + ": SentencePiece normalizer '" + normalizer_name +
                "' is not supported (victor implements the identity normalization LLaMA's tokenizer uses)");
  if (pieces_.size() > (1u << 24))
    throw Error(source + ": " + std::to_string(pieces_.size()) + " pieces is more than victor accepts (16M)");
  for (auto [what, id] : {std::pair<const char*, int64_t>{"unk_id", unk_}, {"bos_id", bos_}, {"eos_id", eos_}})
    if (id < -1 || id >= int64_t(pieces_.size()) || (id < 0 && std::string(what) == "unk_id"))
      throw Error(source + ": " + what + " " + std::to_string(id) + " is not one of its " +
                  std::to_string(pieces_.size()) + " pieces");
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  min_score_ = std::numeric_limits<float>::max();
  for (size_t i = 0; i < pieces_.size(); ++i) {
    Piece& p = pieces_[i];
    if (p.type == 6) {  // "<0xAB>"
      const int hi = p.text.size() == 6 ? hex_digit(p.text[3]) : -1, lo = p.text.size() == 6 ? hex_digit(p.text[4]) : -1;
      if (p.text.compare(0, 3, "<0x") != 0 || hi < 0 || lo < 0 || p.text[5] != '>')
        throw Error(source + ": byte piece " + std::to_string(i) + " is not of the form <0xAB>");
      p.byte = hi * 16 + lo;
      byte_ids_[p.byte] = int64_t(i);
    }
    if (p.type == 1 || p.type == 4) {
      index_.emplace(p.text, int64_t(i));
      max_piece_bytes_ = std::max(max_piece_bytes_, p.text.size());
      if (p.text.find(kSpace, 1) != std::string::npos) words_independent_ = false;
      min_score_ = std::min(min_score_, p.score);
    }
  }
}

// The files that make a tokenizer folder, as transformers writes them.
const char* const kTokenizerFiles[] = {"tokenizer.model", "added_tokens.json", "tokenizer_config.json",
                                       "special_tokens_map.json"};

void copy_tokenizer_files(const std::string& from, const std::string& to) {
  fs::create_directories(to);
  for (const char* f : kTokenizerFiles) {
    const fs::path src = fs::path(from) / f, dst = fs::path(to) / f;
    std::error_code ec;
    if (!fs::exists(src) || (fs::exists(dst) && fs::equivalent(src, dst, ec))) continue;
    write_file_atomic(dst.string(),
                      read_file(src.string(), std::string(f) == "tokenizer.model" ? FileKind::Tokenizer : FileKind::Json));
  }
}

Tokenizer::Tokenizer(const std::string& dir, bool allow_incomplete) {
  if (!allow_incomplete) check_model_folder_complete(dir);
  fs::path model = fs::path(dir) / "tokenizer.model";
  if (!fs::exists(model)) throw Error(model.string() + ": missing (SentencePiece model required)");
  load_model(read_file(model.string(), FileKind::Tokenizer), model.string());
  fs::path added = fs::path(dir) / "added_tokens.json";
  if (fs::exists(added)) load_added_tokens(read_file(added.string(), FileKind::Json), added.string());
  fs::path cfg = fs::path(dir) / "tokenizer_config.json";
  if (fs::exists(cfg)) load_tokenizer_config(read_file(cfg.string(), FileKind::Json), cfg.string());
}

namespace {

json parse_tokenizer_json(const std::string& text, const std::string& source) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(source + ": malformed JSON: " + e.what());
  }
}

constexpr int64_t kMaxTokenId = int64_t(1) << 24;

}  // namespace

void Tokenizer::load_added_tokens(const std::string& text, const std::string& source) {
  json j = parse_tokenizer_json(text, source);
  if (!j.is_object()) throw Error(source + ": must be an object {token: id}");
  for (auto& [k, v] : j.items()) {
    if (k.empty()) throw Error(source + ": an added token is the empty string");
    if (!v.is_number_integer())
      throw Error(source + ": token '" + k + "' must map to an integer id (got " + v.dump() + ")");
    if (v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxTokenId)
      throw Error(source + ": token '" + k + "' has id " + v.dump() + ", outside 0..16M");
    added_[k] = v.get<int64_t>();
  }
}

void Tokenizer::load_tokenizer_config(const std::string& text, const std::string& source) {
  json j = parse_tokenizer_json(text, source);
  if (!j.is_object()) throw Error(source + ": must be a JSON object");
  if (!j.contains("added_tokens_decoder")) return;
  if (!j["added_tokens_decoder"].is_object())
    throw Error(source + ": added_tokens_decoder must be an object {id: {content: ...}}");
  for (auto& [id, v] : j["added_tokens_decoder"].items()) {
    int64_t i = -1;
    if (!id.empty() && id.size() <= 9 && id.find_first_not_of("0123456789") == std::string::npos) i = std::stoll(id);
    if (i < 0 || i >= kMaxTokenId)
      throw Error(source + ": added_tokens_decoder key '" + id + "' is not a token id (0..16M)");
    if (!v.is_object() || (v.contains("content") && !v["content"].is_string()))
      throw Error(source + ": added_tokens_decoder['" + id + "'] must be an object with a string 'content'");
    if (i >= int64_t(pieces_.size()) && v.contains("content")) {
      if (v["content"].get<std::string>().empty())
        throw Error(source + ": added_tokens_decoder['" + id + "'] has an empty 'content'");
      added_[v["content"].get<std::string>()] = i;
    }
  }
}

Tokenizer::~Tokenizer() = default;

int Tokenizer::sp_size() const { return int(pieces_.size()); }

int64_t Tokenizer::vocab_size() const {
  int64_t n = int64_t(pieces_.size());
  for (auto& [k, v] : added_) n = std::max(n, v + 1);
  return n;
}

int64_t Tokenizer::token_id(const std::string& t) const {
  auto it = added_.find(t);
  if (it != added_.end()) return it->second;
  for (size_t i = 0; i < pieces_.size(); ++i)
    if (pieces_[i].text == t) return int64_t(i);
  throw Error("tokenizer: unknown token '" + t + "'");
}

void Tokenizer::push_unknown(const std::string& chunk, std::vector<int64_t>& out) const {
  if (byte_fallback_) {
    for (unsigned char c : chunk)
      out.push_back(byte_ids_[c] >= 0 ? byte_ids_[c] : unk_);
  } else if (out.empty() || out.back() != unk_) {
    out.push_back(unk_);  // SentencePiece merges consecutive unknowns
  }
}

std::vector<int64_t> Tokenizer::encode_unigram(const std::string& s) const {
  // Viterbi over character boundaries: the segmentation with the highest total piece score.
  const size_t n = s.size();
  const float unk_score = min_score_ - 10.0f;
  std::vector<float> best(n + 1, -std::numeric_limits<float>::infinity());
  std::vector<size_t> from(n + 1, 0);
  std::vector<int64_t> piece(n + 1, -1);
  best[0] = 0;
  for (size_t i = 0; i < n; i = i + 0) {
    size_t clen = std::min(utf8_len(static_cast<unsigned char>(s[i])), n - i);
    if (best[i] > -std::numeric_limits<float>::infinity()) {
      bool any = false;
      size_t j = i;
      while (j < n && j - i < max_piece_bytes_) {
        j += std::min(utf8_len(static_cast<unsigned char>(s[j])), n - j);
        auto it = index_.find(s.substr(i, j - i));
        if (it == index_.end()) continue;
        const Piece& p = pieces_[it->second];
        float sc = best[i] + (p.type == 4 ? 0.0f : p.score);
        if (j - i == clen) any = true;
        if (sc > best[j]) {
          best[j] = sc;
          from[j] = i;
          piece[j] = it->second;
        }
      }
      if (!any && best[i] + unk_score > best[i + clen]) {
        best[i + clen] = best[i] + unk_score;
        from[i + clen] = i;
        piece[i + clen] = -1;
      }
    }
    i += clen;
  }
  std::vector<std::pair<size_t, int64_t>> rev;
  for (size_t j = n; j > 0; j = from[j]) rev.emplace_back(j, piece[j]);
  std::vector<int64_t> out;
  for (auto it = rev.rbegin(); it != rev.rend(); ++it) {
    if (it->second >= 0) out.push_back(it->second);
    else push_unknown(s.substr(from[it->first], it->first - from[it->first]), out);
  }
  return out;
}

std::vector<int64_t> Tokenizer::encode_bpe(const std::string& s) const {
  // Characters, then repeatedly merge the adjacent pair whose union is the best-scored piece
  // (ties: the leftmost pair), as SentencePiece's BPE does. Symbols are spans of `s` in a linked
  // list and candidate pairs wait in a heap, checked when popped: O(n log n), where rescanning
  // every pair after each merge took 13 s for 40 kB of text.
  // 16 bytes a symbol and a candidate (a word of the whole text, when words encode alone).
  if (s.size() >= (size_t(1) << 31)) throw Error("tokenizer: a text of " + std::to_string(s.size()) + " bytes in one word");
  struct Sym {
    uint32_t start = 0, len = 0;
    int prev = -1, next = -1;
  };
  std::vector<Sym> sym;
  for (size_t i = 0; i < s.size();) {
    const size_t l = std::min(utf8_len(static_cast<unsigned char>(s[i])), s.size() - i);
    sym.push_back({uint32_t(i), uint32_t(l), int(sym.size()) - 1, int(sym.size()) + 1});
    i += l;
  }
  if (sym.empty()) return {};
  sym.back().next = -1;
  struct Cand {
    float score;
    int left, right;
    uint32_t len;  // the pair's bytes when pushed: a stale candidate no longer matches
  };
  auto worse = [&](const Cand& a, const Cand& b) {
    return a.score != b.score ? a.score < b.score : sym[size_t(a.left)].start > sym[size_t(b.left)].start;
  };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> agenda(worse);
  auto consider = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const uint32_t len = sym[size_t(left)].len + sym[size_t(right)].len;
    auto it = index_.find(s.substr(sym[size_t(left)].start, len));
    if (it != index_.end()) agenda.push({pieces_[size_t(it->second)].score, left, right, len});
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i) consider(int(i), int(i + 1));
  while (!agenda.empty()) {
    const Cand c = agenda.top();
    agenda.pop();
    Sym &l = sym[size_t(c.left)], &r = sym[size_t(c.right)];
    if (l.len == 0 || r.len == 0 || l.next != c.right || l.len + r.len != c.len) continue;  // stale
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[size_t(r.next)].prev = c.left;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }
  std::vector<int64_t> out;
  for (int i = 0; i >= 0; i = sym[size_t(i)].next) {
    const std::string t = s.substr(sym[size_t(i)].start, sym[size_t(i)].len);
    auto it = index_.find(t);
    if (it != index_.end()) out.push_back(it->second);
    else push_unknown(t, out);
  }
  return out;
}

std::vector<int64_t> Tokenizer::encode_piece_text(const std::string& text) const {
  std::string t = text;
  if (remove_extra_whitespaces_) {
    std::string r;
    bool space = false;
    for (char c : t) {
      if (c == ' ') {
        space = !r.empty();
        continue;
      }
      if (space) r.push_back(' ');
      space = false;
      r.push_back(c);
    }
    t = r;
  }
  if (t.empty()) return {};
  if (add_dummy_prefix_) t = " " + t;
  if (escape_whitespaces_) {
    std::string r;
    for (char c : t) r += c == ' ' ? kSpace : std::string(1, c);
    t = r;
  }
  if (!escape_whitespaces_ || !words_independent_) return model_type_ == 2 ? encode_bpe(t) : encode_unigram(t);
  // No piece holds a visible space after its first byte, so a piece never spans a word
  // boundary: every "▁" starts a piece, and each word encodes alone to the same pieces as the
  // whole text (BPE's merges and unigram's best path both stay inside words). Memory then
  // follows the longest word, not the text (a 16 MiB prompt held 875 MiB).
  std::vector<int64_t> out;
  for (size_t a = 0; a < t.size();) {
    size_t b = t.find(kSpace, a + 1);
    if (b == std::string::npos) b = t.size();
    const std::string word = t.substr(a, b - a);
    const std::vector<int64_t> ids = model_type_ == 2 ? encode_bpe(word) : encode_unigram(word);
    size_t from = 0;
    // SentencePiece merges consecutive unknowns: also across the words' seam.
    if (!byte_fallback_ && !ids.empty() && ids[0] == unk_ && !out.empty() && out.back() == unk_) from = 1;
    out.insert(out.end(), ids.begin() + long(from), ids.end());
    a = b;
  }
  return out;
}

size_t Tokenizer::max_bytes_per_token() const {
  size_t m = std::max<size_t>(max_piece_bytes_, 4);  // a byte-fallback token stands for one byte
  for (auto& kv : added_) m = std::max(m, kv.first.size());
  return m;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int64_t> out;
  size_t start = 0, i = 0;
  auto flush = [&](size_t end) {
    if (end <= start) return;
    auto ids = encode_piece_text(text.substr(start, end - start));
    out.insert(out.end(), ids.begin(), ids.end());
  };
  while (i < text.size()) {
    const std::pair<const std::string, int64_t>* hit = nullptr;
    for (auto& kv : added_)
      if (!kv.first.empty() && text.compare(i, kv.first.size(), kv.first) == 0 &&
          (!hit || kv.first.size() > hit->first.size()))
        hit = &kv;
    if (hit) {
      flush(i);
      out.push_back(hit->second);
      i += hit->first.size();
      start = i;
    } else {
      ++i;
    }
  }
  flush(text.size());
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string raw;
  for (auto id : ids) {
    if (id < 0 || id >= int64_t(pieces_.size())) continue;  // added tokens are special
    const Piece& p = pieces_[id];
    if (p.type == 3 || p.type == 5) continue;  // control, unused
    if (p.type == 6) {
      raw.push_back(static_cast<char>(p.byte));
      continue;
    }
    raw += p.type == 2 ? " \xe2\x81\x87 " : p.text;
  }
  std::string out;
  for (size_t i = 0; i < raw.size();) {
    if (raw.compare(i, kSpace.size(), kSpace) == 0) {
      out.push_back(' ');
      i += kSpace.size();
    } else {
      out.push_back(raw[i++]);
    }
  }
  if (add_dummy_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

namespace {
// spm_train's reason for failing: its "Internal: ... [check] reason" line, reduced to the reason
// ("Vocabulary size is smaller than required_chars. 300 vs 660. Increase vocab_size ...").
std::string spm_train_reason(const std::string& log) {
  std::istringstream in(log);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos ||
        line.find("Program terminated") != std::string::npos)
      continue;
    last = line;
    if (line.find("Internal:") != std::string::npos || line.find("Check failed") != std::string::npos) break;
  }
  if (auto p = last.rfind("] "); p != std::string::npos) last = last.substr(p + 2);
  if (last.size() > 300) last = last.substr(0, 300) + "...";
  return last;
}
}  // namespace

int train_tokenizer(const std::vector<std::string>& corpus_lines, const std::string& dir,
                    int vocab_size, const std::string& model_type) {
  if (corpus_lines.empty()) throw Error("tokenizer training: empty corpus");
  if (model_type != "bpe" && model_type != "unigram")
    throw Error("tokenizer training: model type '" + model_type + "' is not bpe or unigram");
  // spm_train works in a private folder of ours (no shell, no user path on its command line);
  // only the finished tokenizer reaches `dir`.
  std::string tmpl = (fs::temp_directory_path() / "victor-spm-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) throw Error("tokenizer training: cannot make a temporary folder in " +
                                         fs::temp_directory_path().string());
  const fs::path work(tmpl);
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{work};
  std::string text;
  for (auto& l : corpus_lines) text += l + "\n";
  write_file_atomic((work / "corpus.txt").string(), text);
  const std::string log = (work / "train.log").string();
  // Relative names in its own folder: spm_train records them in the model, which so stays the
  // same bytes for the same corpus.
  const int rc = run_program({"spm_train", "--input=corpus.txt", "--model_prefix=tok",
                              "--vocab_size=" + std::to_string(vocab_size), "--model_type=" + model_type,
                              "--hard_vocab_limit=false", "--byte_fallback=true", "--split_digits=true",
                              "--character_coverage=1.0", "--num_threads=1", "--normalization_rule_name=identity",
                              "--remove_extra_whitespaces=false", "--unk_id=0", "--bos_id=1", "--eos_id=2",
                              "--pad_id=-1", "--max_sentence_length=100000", "--shuffle_input_sentence=false"},
                             "", log, work.string());
  if (rc == 127 && !program_on_path("spm_train"))
    throw Error("tokenizer training: spm_train not found (Debian's sentencepiece package; scripts/setup.sh installs it)");
  if (rc != 0) {
    std::string reason;
    try {
      reason = spm_train_reason(read_file(log, FileKind::Log));
    } catch (const Error&) {
    }
    throw Error("tokenizer training failed (spm_train, exit " + std::to_string(rc) + ", vocabulary size " +
                std::to_string(vocab_size) + "): " + reason);
  }
  const fs::path made = work / "made";
  fs::create_directories(made);
  fs::rename(work / "tok.model", made / "tokenizer.model");
  int n = Tokenizer(made.string()).sp_size();
  json added = {{"<image>", n}, {"<pad>", n + 1}};
  write_file_atomic((made / "added_tokens.json").string(), added.dump(2) + "\n");
  json cfg = {{"tokenizer_class", "LlamaTokenizer"},
              {"bos_token", "<s>"},
              {"eos_token", "</s>"},
              {"unk_token", "<unk>"},
              {"pad_token", "<pad>"},
              {"add_bos_token", true},
              {"add_eos_token", false},
              {"legacy", true},
              {"added_tokens_decoder",
               {{std::to_string(n), {{"content", "<image>"}, {"special", true}}},
                {std::to_string(n + 1), {{"content", "<pad>"}, {"special", true}}}}}};
  write_file_atomic((made / "tokenizer_config.json").string(), cfg.dump(2) + "\n");
  copy_tokenizer_files(made.string(), dir);
  return n;
}

std::string chat_prompt_text(const std::vector<Turn>& turns) {
  std::string s;
  for (auto& t : turns) {
    s += "USER: " + t.human + " ASSISTANT:";
    if (!t.assistant.empty()) s += " " + t.assistant + "</s>";
  }
  return s;
}

EncodedChat encode_chat(const Tokenizer& tok, const std::vector<Turn>& turns) {
  EncodedChat out;
  out.ids.push_back(tok.bos_id());
  out.is_target.push_back(0);
  for (auto& t : turns) {
    auto prompt = tok.encode("USER: " + t.human + " ASSISTANT:");
    out.ids.insert(out.ids.end(), prompt.begin(), prompt.end());
    out.is_target.insert(out.is_target.end(), prompt.size(), 0);
    if (t.assistant.empty()) continue;
    auto answer = tok.encode(t.assistant);  // SentencePiece's dummy prefix is the space
    answer.push_back(tok.eos_id());
    out.ids.insert(out.ids.end(), answer.begin(), answer.end());
    out.is_target.insert(out.is_target.end(), answer.size(), 1);
  }
  return out;
}

}  // namespace victor
