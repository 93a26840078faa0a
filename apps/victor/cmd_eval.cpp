// victor eval: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor eval ---
struct EvalArgs {
  ImageCap cap;
  std::string model, questions, answers_file, train_data, compare_answers;
  EvalOptions opt;
  int threads = default_threads();
  ReducerChoice reducer;
  std::string dtype = "auto", kv_dtype = "f32";
};

void run_eval(EvalArgs a) {
  set_threads(a.threads);
  refuse_output_over_inputs("--answers-out", a.opt.answers_out,
                            {a.questions, a.answers_file, a.compare_answers, a.train_data});
  auto qs = load_questions_jsonl(a.questions);
  if (a.opt.image_folder.empty()) a.opt.image_folder = fs::path(a.questions).parent_path().string();
  if (!a.model.empty()) {
    Vlm model = load_model(a.model, a.dtype, a.reducer, a.cap);
    a.opt.kv_dtype = kv_dtype_from_string(a.kv_dtype);
    Tokenizer tok(a.model);
    a.opt.model_id = fs::path(a.model).filename().string();
    auto r = evaluate(model, tok, qs, a.opt);
    std::cout << format_report(r);
    if (!a.opt.answers_out.empty()) std::cout << "answers written to " << a.opt.answers_out << "\n";
    if (!a.compare_answers.empty())
      std::cout << format_comparison(compare_reports(r, score_files(a.questions, a.compare_answers, a.opt.limit)),
                                     "this run", a.compare_answers);
  } else if (!a.answers_file.empty()) {
    auto r = score_files(a.questions, a.answers_file, a.opt.limit);
    std::cout << format_report(r);
    if (!a.compare_answers.empty())
      std::cout << format_comparison(compare_reports(r, score_files(a.questions, a.compare_answers, a.opt.limit)),
                                     a.answers_file, a.compare_answers);
  } else {
    throw Error("eval: give --model (answer and score) or --answers (score an answers file)");
  }
  if (!a.train_data.empty()) {
    auto prior = answer_prior(load_llava_json(a.train_data), qs);
    std::cout << "answer-prior baseline: " << format_report(prior);
  }
}

}  // namespace

Command eval_command(CLI::App& app, int, char**) {
  auto ev_h = std::make_shared<EvalArgs>();
  EvalArgs& ev = *ev_h;
  auto* c_eval = app.add_subcommand("eval", "Answer question JSONL and score against references");
  c_eval->add_option("--model", ev.model, "Model folder (omit to only score --answers)");
  c_eval->add_option("--questions", ev.questions, "Questions JSONL: question_id, image, text[, answer, family]")->required()->check(CLI::ExistingFile);
  c_eval->add_option("--answers-out", ev.opt.answers_out, "Write answers JSONL here");
  c_eval->add_option("--answers", ev.answers_file, "Score this answers JSONL instead of running a model")->check(CLI::ExistingFile);
  c_eval->add_option("--image-folder", ev.opt.image_folder, "Folder of the questions' images (default: the JSONL's folder)");
  c_eval->add_option("--batch-size", ev.opt.batch_size, "Questions per batch")->check(CLI::Range(1, 1024))->capture_default_str();
  c_eval->add_option("--max-new-tokens", ev.opt.max_new_tokens, "Answer length limit")->check(CLI::Range(1, 4096))->capture_default_str();
  c_eval->add_option("--limit", ev.opt.limit, "Only the first N questions (answered, scored and compared)")->check(CLI::Range(0, 100000000));
  c_eval->add_option("--compare-answers", ev.compare_answers,
                     "Another run's answers JSONL on the same questions: print the accuracy difference with a "
                     "paired 95% bootstrap interval and how often the answers agree")
      ->check(CLI::ExistingFile);
  c_eval->add_option("--train-data", ev.train_data, "LLaVA JSON to compute the answer-prior baseline from")->check(CLI::ExistingFile);
  c_eval->add_option("--threads", ev.threads, "CPU threads")->check(CLI::Range(1, 1024));
  add_reducer_options(c_eval, ev.reducer);
  add_cap_options(c_eval, ev.cap);
  add_dtype_option(c_eval, ev.dtype);
  add_kv_dtype_option(c_eval, ev.kv_dtype);
  return {c_eval, [ev_h] { run_eval(*ev_h); return 0; }};
}

}  // namespace victor::cli
