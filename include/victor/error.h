// The one exception type victor throws. Messages name the file, tensor, field or sample.
#pragma once
#include <stdexcept>
#include <string>

// The file helpers that used to live here (read_file, write_file_atomic) are in files.h.
#include "victor/files.h"

namespace victor {

struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace victor
