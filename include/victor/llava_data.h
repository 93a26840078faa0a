// LLaVA's training JSON and evaluation JSONL (no LibTorch: the fuzz build links this alone).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "victor/tokenizer.h"

namespace victor {

// --- LLaVA formats ---
struct Conversation {
  std::string id;
  std::string image;  // empty = text only
  std::vector<Turn> turns;
};
// Malformed samples throw an Error naming the sample id, or when `bad` is given are skipped and
// listed there ("id: reason").
std::vector<Conversation> load_llava_json(const std::string& path,
                                          std::vector<std::string>* bad = nullptr);
// The same from the file's text (`path` only names it in errors).
std::vector<Conversation> parse_llava_json(const std::string& text, const std::string& path,
                                           std::vector<std::string>* bad = nullptr);
// Each turn of a multi-turn conversation as its own sample (id "ID#k", the image placeholder at
// the start of every one). In a conversation about one image the later questions can lean on the
// earlier answers: on GridVQA's 2x2 identify, a model that knows only the asked row answers the
// row's second question by elimination, and that half-solution holds (notebook@f64a969, item 12).
std::vector<Conversation> split_turns(const std::vector<Conversation>& convs);

struct EvalQuestion {
  nlohmann::json question_id;
  std::string image, text, answer, family;
};
std::vector<EvalQuestion> load_questions_jsonl(const std::string& path);
std::vector<EvalQuestion> parse_questions_jsonl(const std::string& text, const std::string& path);

}  // namespace victor
