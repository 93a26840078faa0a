// JSON Lines (jsonl.h).
#include "victor/jsonl.h"

#include "victor/error.h"

namespace victor {

void for_each_jsonl(const std::string& text, const std::string& path,
                    const std::function<bool(const nlohmann::json&, int)>& f, bool skip_malformed) {
  int n = 0;
  for (size_t at = 0; at < text.size();) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(at, end - at);
    at = end + 1;
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      if (skip_malformed) continue;
      if (j.is_discarded()) {
        try {
          (void)nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          throw Error(path + ":" + std::to_string(n) + ": malformed JSON: " + e.what());
        }
      }
      throw Error(path + ":" + std::to_string(n) + ": expected an object");
    }
    if (!f(j, n)) return;
  }
}

void for_each_jsonl_file(const std::string& path, FileKind kind,
                         const std::function<bool(const nlohmann::json&, int)>& f, bool skip_malformed) {
  for_each_jsonl(read_file(path, kind), path, f, skip_malformed);
}

}  // namespace victor
