// victor: the command dispatcher. Each command (apps/victor/cmd_*.cpp) declares its options and
// what it runs; this file builds the app, parses, runs the command given and turns errors into
// one line and exit code 1.
#include "cli.h"

using namespace victor;
using namespace victor::cli;

int main(int argc, char** argv) {
  victor::ensure_fast_blas(argv);
  // The subcommand is the first argument that is not an option (victor has no global options
  // taking values).
  const char* command = "";
  for (int i = 1; i < argc; ++i)
    if (argv[i][0] != '-') {
      command = argv[i];
      break;
    }
  tune_allocator(std::string(command) == "serve");
  CLI::App app{"victor: efficient vision-language models with Visual Compact Token Registers"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every subcommand");
  std::vector<Command> commands;
  for (auto make : {init_command, generate_command, serve_command, bench_serve_command, data_command, train_command,
                    eval_command, bench_command, quantize_command, repro_command, train_vision_command})
    commands.push_back(make(app, argc, argv));

  check_all_options(&app);
  try {
    refuse_empty_list_items(&app, argc, argv);
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (const Command& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const victor::Error& e) {
    std::cerr << "victor: error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    std::cerr << "victor: error: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    // Sizes from files are bounded before allocating; what is left is a model or batch too large
    // for this machine's memory.
    std::cerr << "victor: error: out of memory (the model, batch or context needs more RAM than is free; "
                 "try --dtype int8/bf16, a smaller --batch-size or fewer --threads)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "victor: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

