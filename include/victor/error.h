// The one exception type victor throws. Messages name the file, tensor, field or sample.
#pragma once
#include <stdexcept>
#include <string>

namespace victor {

struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace victor
