#include "victor/eval.h"

#include <set>

#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "victor/error.h"
#include "victor/files.h"
#include "victor/jsonl.h"
#include "victor/generate.h"
#include "victor/progress.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

std::string normalize_answer(const std::string& in) {
  static const std::map<std::string, std::string> numbers = {
      {"none", "0"},  {"zero", "0"},  {"one", "1"},    {"two", "2"},   {"three", "3"},
      {"four", "4"},  {"five", "5"},  {"six", "6"},    {"seven", "7"}, {"eight", "8"},
      {"nine", "9"},  {"ten", "10"},  {"eleven", "11"}, {"twelve", "12"}, {"thirteen", "13"},
      {"fourteen", "14"}, {"fifteen", "15"}, {"sixteen", "16"}};
  std::string s;
  for (char c : in) {
    unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u) || c == ' ' || c == '-' || (u & 0x80)) s.push_back(char(std::tolower(u)));
    else if (c == '\n' || c == '\t') s.push_back(' ');
    else if (c != '\'') s.push_back(' ');  // punctuation splits words; apostrophes join them
  }
  std::istringstream words(s);
  std::string w, out;
  while (words >> w) {
    if (w == "a" || w == "an" || w == "the") continue;
    auto it = numbers.find(w);
    if (it != numbers.end()) w = it->second;
    if (!out.empty()) out.push_back(' ');
    out += w;
  }
  return out;
}

EvalReport score_answers(const std::vector<AnswerRecord>& answers) {
  EvalReport r;
  for (auto& a : answers) {
    ++r.answered;
    if (a.reference.empty()) continue;
    const std::string said = normalize_answer(a.text);
    bool ok = said == normalize_answer(a.reference);
    r.ids.push_back(a.question_id.dump());
    r.answers.push_back(said);
    r.correct.push_back(ok);
    r.overall.total++;
    r.overall.correct += ok;
    auto& f = r.per_family[a.family.empty() ? "all" : a.family];
    f.total++;
    f.correct += ok;
  }
  return r;
}

EvalReport score_files(const std::string& questions_jsonl, const std::string& answers_jsonl, int limit) {
  auto qs = load_questions_jsonl(questions_jsonl);
  // With a limit, answers to the questions beyond it are skipped (a full run's file scored on the
  // first N, as `eval --limit N` answers them); ids in no line of the file are still refused.
  std::set<std::string> beyond;
  if (limit > 0 && int(qs.size()) > limit) {
    for (size_t i = size_t(limit); i < qs.size(); ++i) beyond.insert(qs[i].question_id.dump());
    qs.resize(size_t(limit));
  }
  std::map<std::string, const EvalQuestion*> by_id;
  for (auto& q : qs) by_id[q.question_id.dump()] = &q;
  std::vector<AnswerRecord> answers;
  std::set<std::string> answered;
  for_each_jsonl_file(answers_jsonl, FileKind::Dataset, [&](const json& j, int n) {
    if (!j.contains("question_id") || !j.contains("text") || !j["text"].is_string())
      throw Error(answers_jsonl + ":" + std::to_string(n) + ": needs 'question_id' and string 'text'");
    const std::string id = j["question_id"].dump();
    auto it = by_id.find(id);
    if (it == by_id.end() && beyond.count(id)) return true;
    if (it == by_id.end())
      throw Error(answers_jsonl + ":" + std::to_string(n) + ": question_id " + id + " is not in " + questions_jsonl);
    if (!answered.insert(it->first).second)
      throw Error(answers_jsonl + ":" + std::to_string(n) + ": question_id " + id + " is answered twice");
    answers.push_back({j["question_id"], j["text"].get<std::string>(), it->second->answer, it->second->family});
    return true;
  });
  // Scoring only the answered questions would report a higher accuracy for a file that skips the
  // hard ones: every question must have its answer.
  if (answered.size() != by_id.size()) {
    std::string first;
    for (auto& q : qs)
      if (!answered.count(q.question_id.dump())) {
        first = q.question_id.dump();
        break;
      }
    throw Error(answers_jsonl + ": " + std::to_string(by_id.size() - answered.size()) + " of " +
                std::to_string(by_id.size()) + (beyond.empty() ? " questions in " : " first questions in ") + questions_jsonl +
                " have no answer (the first: question_id " + first + "); every question must be answered");
  }
  return score_answers(answers);
}

EvalReport evaluate(const Vlm& model, const Tokenizer& tok, const std::vector<EvalQuestion>& all,
                    const EvalOptions& opt, std::vector<AnswerRecord>* answers_out) {
  std::vector<EvalQuestion> qs = all;
  if (opt.limit > 0 && int(qs.size()) > opt.limit) qs.resize(size_t(opt.limit));
  if (opt.batch_size < 1) throw Error("eval: --batch-size must be >= 1");
  auto t0 = std::chrono::steady_clock::now();
  Progress bar("eval", int64_t(qs.size()), opt.progress && isatty(2));
  std::vector<AnswerRecord> answers;
  std::string lines;
  SamplingOptions so;
  so.max_new_tokens = opt.max_new_tokens;
  so.kv_dtype = opt.kv_dtype;
  for (size_t start = 0; start < qs.size(); start += size_t(opt.batch_size)) {
    size_t end = std::min(qs.size(), start + size_t(opt.batch_size));
    std::vector<Request> reqs;
    for (size_t i = start; i < end; ++i) {
      Request r;
      r.prompt = qs[i].text;
      if (!qs[i].image.empty()) r.images.push_back(load_image((fs::path(opt.image_folder) / qs[i].image).string()));
      reqs.push_back(std::move(r));
    }
    auto res = generate(model, tok, reqs, so);
    for (size_t i = start; i < end; ++i) {
      const std::string& text = res.texts[i - start];
      answers.push_back({qs[i].question_id, text, qs[i].answer, qs[i].family});
      json j = {{"question_id", qs[i].question_id}, {"prompt", qs[i].text}, {"text", text},
                {"model_id", opt.model_id}, {"metadata", json::object()}};
      if (!qs[i].family.empty()) j["family"] = qs[i].family;
      lines += j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    }
    double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char extra[64];
    std::snprintf(extra, sizeof extra, "%.1f q/s", double(end) / el);
    bar.update(int64_t(end), extra);
  }
  bar.finish();
  if (!opt.answers_out.empty()) write_file_atomic(opt.answers_out, lines);
  EvalReport r = score_answers(answers);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.questions_per_second = r.seconds > 0 ? r.answered / r.seconds : 0;
  if (answers_out) *answers_out = std::move(answers);
  return r;
}

EvalReport answer_prior(const std::vector<Conversation>& train, const std::vector<EvalQuestion>& qs) {
  std::map<std::string, std::map<std::string, int>> by_question;
  std::map<std::string, int> overall;
  for (auto& c : train)
    for (auto& t : c.turns) {
      std::string q = t.human;
      auto p = q.find("<image>");
      if (p != std::string::npos) q.erase(p, 7);
      while (!q.empty() && (q[0] == '\n' || q[0] == ' ')) q.erase(0, 1);
      by_question[q][normalize_answer(t.assistant)]++;
      overall[normalize_answer(t.assistant)]++;
    }
  auto best = [](const std::map<std::string, int>& m) {
    std::string b;
    int n = -1;
    for (auto& [a, c] : m)
      if (c > n) b = a, n = c;
    return b;
  };
  std::vector<AnswerRecord> answers;
  for (auto& q : qs) {
    auto it = by_question.find(q.text);
    answers.push_back({q.question_id, it != by_question.end() ? best(it->second) : best(overall), q.answer, q.family});
  }
  return score_answers(answers);
}

std::string format_report(const EvalReport& r) {
  std::ostringstream o;
  char buf[256];
  std::snprintf(buf, sizeof buf, "accuracy %.2f%% (%d/%d)", 100 * r.overall.accuracy(), r.overall.correct,
                r.overall.total);
  o << buf;
  if (!r.correct.empty()) {
    Interval i = r.interval();
    std::snprintf(buf, sizeof buf, ", 95%% interval [%.2f, %.2f]", 100 * i.lo, 100 * i.hi);
    o << buf;
  }
  if (r.questions_per_second > 0) {
    std::snprintf(buf, sizeof buf, ", %.2f questions/s", r.questions_per_second);
    o << buf;
  }
  o << "\n";
  for (auto& [f, s] : r.per_family) {
    std::snprintf(buf, sizeof buf, "  %-10s %6.2f%% (%d/%d)\n", f.c_str(), 100 * s.accuracy(), s.correct, s.total);
    o << buf;
  }
  return o.str();
}

EvalComparison compare_reports(const EvalReport& a, const EvalReport& b) {
  std::map<std::string, size_t> in_b;
  for (size_t i = 0; i < b.ids.size(); ++i) in_b[b.ids[i]] = i;
  std::vector<uint8_t> ca, cb;
  int same = 0;
  for (size_t i = 0; i < a.ids.size(); ++i) {
    auto it = in_b.find(a.ids[i]);
    if (it == in_b.end()) continue;
    ca.push_back(a.correct[i]);
    cb.push_back(b.correct[it->second]);
    same += a.answers[i] == b.answers[it->second];
  }
  if (ca.empty()) throw Error("compare: the two runs share no scored question");
  EvalComparison c;
  c.paired = int(ca.size());
  c.difference = paired_bootstrap_difference(ca, cb);
  c.same_answer = double(same) / double(ca.size());
  return c;
}

std::string format_comparison(const EvalComparison& c, const std::string& a, const std::string& b) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "%s minus %s: %+.2f points, 95%% paired interval [%+.2f, %+.2f] over %d questions; "
                "same answer on %.2f%%\n",
                a.c_str(), b.c_str(), 100 * c.difference.estimate, 100 * c.difference.lo, 100 * c.difference.hi,
                c.paired, 100 * c.same_answer);
  return buf;
}

}  // namespace victor
