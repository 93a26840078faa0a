// The victor command line: each command is one file (cmd_*.cpp) that declares its options and
// returns what it runs; main.cpp is the dispatcher. What the commands share is declared here.
#pragma once
#include <CLI/CLI.hpp>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <optional>
#include <set>
#include <thread>

#include "victor/bench.h"
#include "victor/serve/bench_serve.h"
#include "victor/blas.h"
#include "victor/gridvqa.h"
#include "victor/distributed.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/eval.h"
#include "victor/generate.h"
#include "victor/kernels.h"
#include "victor/npy.h"
#include "victor/progress.h"
#include "victor/repro.h"
#include "victor/safetensors.h"
#include "victor/serve/server.h"
#include "victor/tokenizer.h"
#include "victor/train.h"

namespace victor::cli {

namespace fs = std::filesystem;

// A command: its (sub)command in the CLI11 app and what runs when it was given (the exit code).
struct Command {
  CLI::App* app;
  std::function<int()> run;
};
Command init_command(CLI::App& app, int argc, char** argv);
Command generate_command(CLI::App& app, int argc, char** argv);
Command serve_command(CLI::App& app, int argc, char** argv);
Command bench_serve_command(CLI::App& app, int argc, char** argv);
Command data_command(CLI::App& app, int argc, char** argv);
Command train_command(CLI::App& app, int argc, char** argv);
Command eval_command(CLI::App& app, int argc, char** argv);
Command bench_command(CLI::App& app, int argc, char** argv);
Command quantize_command(CLI::App& app, int argc, char** argv);
Command repro_command(CLI::App& app, int argc, char** argv);
Command train_vision_command(CLI::App& app, int argc, char** argv);

// All cores, unless OMP_NUM_THREADS says otherwise (CI runs tests side by side).
int default_threads();
void set_threads(int n);
std::vector<std::string> read_lines(const std::string& path);

// Validators every command's options use.
extern const CLI::Validator kFinite;    // a floating-point option is a finite number
extern const CLI::Validator kNonEmpty;  // an empty string is a mistake, not "the default"
extern const CLI::Validator kUint64;    // a seed within 64 bits
// Every option of every command: no empty values, seeds within 64 bits.
void check_all_options(CLI::App* app);
void refuse_empty_list_items(CLI::App* app, int argc, char** argv);

// What the command line asks for: a `--reducer` spec, or Victor's and pooling's older flags
// (--registers, --summary-layers, --register-mask, --visual-pool/--pool) as a change to the model's
// own reducer. Unset values keep the current settings.
struct ReducerChoice {
  std::string spec;             // --reducer
  int registers = -1;           // --registers (-1 = keep)
  int summary_layers = -2;      // --summary-layers (-2 = keep, -1 = never drop)
  std::string mask;             // --register-mask ("" = keep)
  int pool = 0;                 // --visual-pool (0 = not given)
  bool any() const { return !spec.empty() || registers >= 0 || summary_layers != -2 || !mask.empty() || pool > 0; }
  // The reducer to use on a model whose reducer is `current`; conflicting flags are refused.
  Reducer resolve(const Reducer& current) const;
};

void add_kv_dtype_option(CLI::App* c, std::string& kv);
void add_dtype_option(CLI::App* c, std::string& dtype, bool with_auto = true);
void add_overwrite_flag(CLI::App* c, bool& overwrite);
void add_distributed_options(CLI::App* c, int& nproc, int& timeout_seconds, const std::string& nproc_help);
// --reducer (its help lists the reducer table's kinds) and Victor's / pooling's shorthand flags.
void add_reducer_options(CLI::App* c, ReducerChoice& r, bool pool_flag = true);
std::string reducer_help();

// LLaVA-NeXT's image-token bill: a cap that picks fewer crops (a smaller pinpoint, or the base
// view alone). Run-time settings: they change which views are made, not the model.
struct ImageCap {
  int max_crops = 0, max_image_tokens = 0;
};
void add_cap_options(CLI::App* c, ImageCap& cap);
void apply_cap(Vlm& model, const ImageCap& cap);
// Applies --reducer (or Victor's shorthand flags) to a loaded model. Trained registers stay when
// the count matches; a different count replaces them with new ones, said on stderr.
void apply_reducer(Vlm& model, const ReducerChoice& choice, const std::string& init,
                   const std::vector<std::string>& calibration, uint64_t seed);
// The one model-loading step of generate, eval and serve: the folder in the asked weight format,
// then the reducer and the image-token cap.
Vlm load_model(const std::string& dir, const std::string& dtype, const ReducerChoice& reducer, const ImageCap& cap,
               const std::string& register_init = "random", const std::vector<std::string>& calibration = {},
               uint64_t seed = 0);

// `--nproc N` (train, repro): refused under a launcher that already set RANK; otherwise, for N > 1
// with no RANK set, this process becomes the launcher of N workers and returns their exit code.
// nullopt: this process is the (only or a launched) worker and runs the command itself.
std::optional<int> launch_workers_if_asked(int argc, char** argv, int nproc, bool threads_given);

}  // namespace victor::cli
