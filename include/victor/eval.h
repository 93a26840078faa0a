// Evaluation: answer LLaVA-style question JSONL in batches, score with VQA normalization.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "victor/gridvqa.h"
#include "victor/model.h"
#include "victor/stats.h"
#include "victor/tokenizer.h"

namespace victor {

// VQA-style: lower case, punctuation and articles removed, number words to digits, spaces collapsed.
std::string normalize_answer(const std::string& s);

struct FamilyScore {
  int correct = 0, total = 0;
  double accuracy() const { return total ? double(correct) / total : 0.0; }
};

struct EvalReport {
  FamilyScore overall;
  std::map<std::string, FamilyScore> per_family;
  int answered = 0;
  double seconds = 0, questions_per_second = 0;
  // Per scored question, in order: its id (JSON text), 0/1, and the normalised answer (for
  // confidence intervals and paired comparisons between runs on the same questions).
  std::vector<std::string> ids, answers;
  std::vector<uint8_t> correct;
  Interval interval() const { return bootstrap_mean(correct); }  // 95% over questions
};

// Two runs on the same questions, paired by question id.
struct EvalComparison {
  int paired = 0;          // questions both runs scored
  Interval difference;     // accuracy of a minus b, paired 95% bootstrap (fractions)
  double same_answer = 0;  // share of paired questions with identical normalised answers
};
EvalComparison compare_reports(const EvalReport& a, const EvalReport& b);
std::string format_comparison(const EvalComparison& c, const std::string& a, const std::string& b);

struct AnswerRecord {
  nlohmann::json question_id;
  std::string text, reference, family;
};

// Scores answers against references (questions without a reference are not scored).
EvalReport score_answers(const std::vector<AnswerRecord>& answers);
// Reads an answers JSONL (question_id, text) and a questions JSONL with references, and scores.
// limit > 0: only the file's first `limit` questions (answers to later ones are skipped).
EvalReport score_files(const std::string& questions_jsonl, const std::string& answers_jsonl, int limit = 0);

struct EvalOptions {
  std::string image_folder;  // default: the questions file's folder
  std::string answers_out;   // answers JSONL (atomic); empty = don't write
  int batch_size = 8, max_new_tokens = 16, limit = 0;
  bool progress = true;
  std::string model_id = "victor";
  torch::ScalarType kv_dtype = torch::kFloat32;  // KV-cache storage (SamplingOptions::kv_dtype)
};

EvalReport evaluate(const Vlm& model, const Tokenizer& tok, const std::vector<EvalQuestion>& qs,
                    const EvalOptions& opt, std::vector<AnswerRecord>* answers = nullptr);

// The best answer-prior baseline: the most frequent training answer for the same question text
// (else for the same family), scored on the questions.
EvalReport answer_prior(const std::vector<Conversation>& train, const std::vector<EvalQuestion>& qs);

std::string format_report(const EvalReport& r);

}  // namespace victor
