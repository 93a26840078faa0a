// LLaVA's training JSON and evaluation JSONL.
#include <sstream>

#include "victor/error.h"
#include "victor/files.h"
#include "victor/jsonl.h"
#include "victor/llava_data.h"

using json = nlohmann::json;

namespace victor {

namespace {

// A gpt turn's "boxes": [[x0, y0, x1, y1], ...], normalized to the image, x0 < x1, y0 < y1.
template <class Fail>
std::vector<Box> parse_boxes(const json& j, size_t turn, const Fail& fail) {
  const std::string where = "turn " + std::to_string(turn) + ": 'boxes' ";
  if (!j.is_array()) fail(where + "must be a list of [x0, y0, x1, y1]");
  std::vector<Box> out;
  for (const json& b : j) {
    if (!b.is_array() || b.size() != 4) fail(where + "must be a list of [x0, y0, x1, y1]");
    Box box;
    for (size_t i = 0; i < 4; ++i) {
      if (!b[i].is_number()) fail(where + "holds a non-number: " + b.dump());
      box[i] = b[i].get<float>();
      if (box[i] < 0 || box[i] > 1) fail(where + "must be normalized to [0, 1]: " + b.dump());
    }
    if (box[0] >= box[2] || box[1] >= box[3]) fail(where + "needs x0 < x1 and y0 < y1: " + b.dump());
    out.push_back(box);
  }
  return out;
}

}  // namespace

std::vector<Conversation> load_llava_json(const std::string& path, std::vector<std::string>* bad) {
  return parse_llava_json(read_file(path, FileKind::Dataset), path, bad);
}

std::vector<Conversation> parse_llava_json(const std::string& text, const std::string& path,
                                           std::vector<std::string>* bad) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(path + ": malformed JSON: " + e.what());
  }
  if (!j.is_array()) throw Error(path + ": expected a JSON list of samples");
  std::vector<Conversation> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& s = j[i];
    std::string id = s.contains("id") ? (s["id"].is_string() ? s["id"].get<std::string>() : s["id"].dump())
                                      : "#" + std::to_string(i);
    auto fail = [&](const std::string& why) { throw Error(path + ": sample '" + id + "': " + why); };
    try {
    if (!s.is_object()) fail("not an object");
    Conversation c;
    c.id = id;
    if (s.contains("image") && !s["image"].is_null()) {
      if (!s["image"].is_string()) fail("'image' must be a string");
      c.image = s["image"].get<std::string>();
    }
    if (!s.contains("conversations") || !s["conversations"].is_array())
      fail("missing list 'conversations'");
    const json& conv = s["conversations"];
    if (conv.size() < 2 || conv.size() % 2 != 0) fail("conversations must be human/gpt pairs");
    for (size_t t = 0; t < conv.size(); t += 2) {
      const json& h = conv[t];
      const json& a = conv[t + 1];
      if (!h.is_object() || !a.is_object() || !h.contains("from") || !a.contains("from") ||
          !h.contains("value") || !a.contains("value") || !h["value"].is_string() ||
          !a["value"].is_string())
        fail("turn " + std::to_string(t / 2) + ": needs 'from' and string 'value'");
      if (h["from"] != "human" || a["from"] != "gpt")
        fail("turn " + std::to_string(t / 2) + ": expected from 'human' then 'gpt'");
      Turn turn{h["value"].get<std::string>(), a["value"].get<std::string>()};
      if (a.contains("boxes")) turn.boxes = parse_boxes(a["boxes"], t / 2, fail), turn.grounded = true;
      c.turns.push_back(std::move(turn));
    }
    size_t placeholders = 0;
    for (auto& t : c.turns)
      for (size_t p = t.human.find("<image>"); p != std::string::npos; p = t.human.find("<image>", p + 1))
        ++placeholders;
    if (!c.image.empty() && placeholders == 0) fail("has an image but no <image> in its conversation");
    if (c.image.empty() && placeholders > 0) fail("has <image> in its conversation but no 'image'");
    if (placeholders > 1) fail("more than one <image> for a single image");
    for (auto& t : c.turns)
      if (t.grounded && c.image.empty()) fail("has 'boxes' but no image to ground them in");
    out.push_back(std::move(c));
    } catch (const Error& e) {
      if (!bad) throw;
      bad->push_back(e.what());
    }
  }
  return out;
}

std::vector<Conversation> split_turns(const std::vector<Conversation>& convs) {
  std::vector<Conversation> out;
  out.reserve(convs.size());
  for (const Conversation& c : convs) {
    if (c.turns.size() <= 1) {
      out.push_back(c);
      continue;
    }
    for (size_t t = 0; t < c.turns.size(); ++t) {
      Conversation one{c.id + "#" + std::to_string(t), c.image, {c.turns[t]}};
      if (!c.image.empty()) {
        std::string& h = one.turns[0].human;
        for (const std::string tag : {"<image>\n", "\n<image>", "<image>"})
          if (auto p = h.find(tag); p != std::string::npos) {
            h.erase(p, tag.size());
            break;
          }
        // Erasing can join the text around the tag into a new one ("<imag<image>e>", found by
        // fuzz_llava): the tokenizer would read a second image there. Remove until none is left.
        for (size_t p = h.find("<image>"); p != std::string::npos; p = h.find("<image>")) h.erase(p, 7);
        h = "<image>\n" + h;
      }
      out.push_back(std::move(one));
    }
  }
  return out;
}

std::vector<EvalQuestion> load_questions_jsonl(const std::string& path) {
  std::string text;
  try {
    text = read_file(path, FileKind::Dataset);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (questions file)");
  }
  return parse_questions_jsonl(text, path);
}

std::vector<EvalQuestion> parse_questions_jsonl(const std::string& text, const std::string& path) {
  std::vector<EvalQuestion> out;
  for_each_jsonl(text, path, [&](const json& j, int n) {
    auto fail = [&](const std::string& why) { throw Error(path + ":" + std::to_string(n) + ": " + why); };
    if (!j.contains("question_id")) fail("missing 'question_id'");
    if (!j.contains("text") || !j["text"].is_string()) fail("missing string 'text'");
    EvalQuestion q;
    q.question_id = j["question_id"];
    q.text = j["text"].get<std::string>();
    if (j.contains("image") && j["image"].is_string()) q.image = j["image"].get<std::string>();
    if (j.contains("answer") && j["answer"].is_string()) q.answer = j["answer"].get<std::string>();
    if (j.contains("family") && j["family"].is_string()) q.family = j["family"].get<std::string>();
    out.push_back(std::move(q));
    return true;
  });
  return out;
}

}  // namespace victor
