// Whole-file reads and atomic writes (temporary name, then rename). No torch: the fuzz build
// links this file alone.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <vector>

#include "victor/error.h"

namespace fs = std::filesystem;

namespace victor {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_file_atomic_streamed(path, [&](std::ostream& out) {
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  });
}

namespace {

// Flushes a file (or folder) to the disk: a rename is only crash-proof against power loss once
// the data it points at is on disk, and the folder entry after it.
void sync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

constexpr const char* kTmpTag = ".tmp";

}  // namespace

void write_file_atomic_streamed(const std::string& path,
                                const std::function<void(std::ostream&)>& write) {
  fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  std::random_device rd;
  std::string tmp = path + kTmpTag + std::to_string(rd() % 1000000);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(path + ": cannot write (temporary " + tmp + "): " + std::strerror(errno));
    try {
      write(out);
    } catch (const Error& e) {
      out.close();
      std::remove(tmp.c_str());
      throw Error(path + ": " + e.what());
    } catch (...) {
      out.close();
      std::remove(tmp.c_str());
      throw;
    }
    out.flush();
    if (!out) {
      const int err = errno;
      out.close();
      std::remove(tmp.c_str());
      throw Error(path + ": write failed (" + std::string(err ? std::strerror(err) : "disk full?") +
                  "); the previous file, if any, is unchanged");
    }
    out.close();
    if (out.fail()) {
      const int err = errno;
      std::remove(tmp.c_str());
      throw Error(path + ": write failed (" + std::string(err ? std::strerror(err) : "disk full?") +
                  "); the previous file, if any, is unchanged");
    }
  }
  sync_path(tmp);
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw Error(path + ": cannot rename temporary file: " + ec.message());
  }
  sync_path(target.has_parent_path() ? target.parent_path().string() : ".");
}

int remove_stale_temporaries(const std::string& dir) {
  std::vector<fs::path> stale;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const size_t at = name.rfind(kTmpTag);
    if (at == std::string::npos || at + 4 == name.size()) continue;
    if (name.find_first_not_of("0123456789", at + 4) != std::string::npos) continue;
    if (it->is_regular_file(ec)) stale.push_back(it->path());
  }
  int removed = 0;
  for (auto& p : stale) removed += fs::remove(p, ec) ? 1 : 0;
  return removed;
}

}  // namespace victor
