// The one exception type victor throws. Messages name the file, tensor, field or sample.
#pragma once
#include <functional>
#include <ostream>
#include <stdexcept>
#include <string>

namespace victor {

struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Writes `bytes` to `path` atomically: a temporary file in the same folder, then rename.
void write_file_atomic(const std::string& path, const std::string& bytes);
// The same, with the content streamed by `write` (large checkpoints are never held twice).
void write_file_atomic_streamed(const std::string& path,
                                const std::function<void(std::ostream&)>& write);
std::string read_file(const std::string& path);
// Removes the temporaries a killed write_file_atomic left in dir (NAME.tmpDIGITS); returns how many.
int remove_stale_temporaries(const std::string& dir);

}  // namespace victor
