// JSON Lines, read one way everywhere (questions, answers, GridVQA's grids): the
// file through read_file's bound, blank lines skipped, every other line a JSON object, and an
// error naming path:line for a line that is not.
#pragma once
#include <nlohmann/json.hpp>

#include <functional>
#include <string>

#include "victor/files.h"

namespace victor {

// Calls f(object, line number) for each non-blank line of `text` (read from `path`, which errors
// name); f returns false to stop. A malformed line throws Error, unless `skip_malformed` (a log a
// kill may have cut short), when it is passed over.
void for_each_jsonl(const std::string& text, const std::string& path,
                    const std::function<bool(const nlohmann::json&, int)>& f, bool skip_malformed = false);
// The same on the file at `path` (a regular file within the FileKind's size cap).
void for_each_jsonl_file(const std::string& path, FileKind kind,
                         const std::function<bool(const nlohmann::json&, int)>& f, bool skip_malformed = false);

}  // namespace victor
