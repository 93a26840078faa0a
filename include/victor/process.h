// Running another program without a shell: arguments go to execvp one by one, so no user string
// is ever parsed as shell syntax.
#pragma once
#include <string>
#include <vector>

namespace victor {

// Runs argv[0] (found on PATH) with argv, waits, and returns its exit status (128 + signal when a
// signal ended it, 127 when it could not start). stdin reads `stdin_path` (empty: /dev/null);
// stdout and stderr go to `output_path` (empty: /dev/null); it runs in folder `cwd` (empty: ours).
int run_program(const std::vector<std::string>& argv, const std::string& stdin_path = "",
                const std::string& output_path = "", const std::string& cwd = "");
// True when `name` is an executable on PATH.
bool program_on_path(const std::string& name);

}  // namespace victor
