// Bounded reads, atomic writes, model folders written as a whole, outputs kept off inputs.
// No torch: the fuzz build links this file alone.
#include "victor/files.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <map>

#include "victor/error.h"

namespace fs = std::filesystem;

namespace victor {

uint64_t max_file_bytes(FileKind kind) {
  constexpr uint64_t MiB = 1 << 20;
  switch (kind) {
    case FileKind::Json: return 64 * MiB;  // a sharded 70B index is ~100 KB
    case FileKind::Tokenizer: return 64 * MiB;  // LLaMA's 0.5 MB, Gemma's 4 MB
    case FileKind::Image: return 256 * MiB;  // a 16k x 16k PNG compresses far below this
    case FileKind::Dataset: return 4096 * MiB;  // LLaVA-665k's mix JSON is 1 GB
    case FileKind::Array: return 4096 * MiB;
    case FileKind::Log: return 16 * MiB;
  }
  return 0;
}

const char* file_kind_name(FileKind kind) {
  switch (kind) {
    case FileKind::Json: return "JSON files";
    case FileKind::Tokenizer: return "tokenizer models";
    case FileKind::Image: return "images";
    case FileKind::Dataset: return "datasets";
    case FileKind::Array: return "arrays";
    case FileKind::Log: return "logs";
  }
  return "files";
}

namespace {

const char* file_type_name(mode_t m) {
  if (S_ISDIR(m)) return "a folder";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string read_file(const std::string& path, FileKind kind) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
  Fd f{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (f.fd < 0) throw Error(path + ": cannot open file (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw Error(path + ": cannot stat file (" + std::strerror(errno) + ")");
  if (!S_ISREG(st.st_mode))
    throw Error(path + ": " + file_type_name(st.st_mode) + ", not a regular file; victor reads only regular files");
  const uint64_t cap = max_file_bytes(kind);
  if (uint64_t(st.st_size) > cap)
    throw Error(path + ": " + mib(uint64_t(st.st_size)) + " is more than the " + mib(cap) + " victor reads for " +
                file_kind_name(kind));
  auto read_some = [&](char* dst, size_t n) {
    for (;;) {
      const ssize_t got = ::read(f.fd, dst, n);
      if (got >= 0) return size_t(got);
      if (errno != EINTR) throw Error(path + ": read failed (" + std::strerror(errno) + ")");
    }
  };
  // What fstat promised, in one buffer of that size (a 1 GB dataset is never held twice)...
  std::string out(size_t(st.st_size), '\0');
  size_t have = 0;
  while (have < out.size()) {
    const size_t got = read_some(out.data() + have, out.size() - have);
    if (got == 0) break;  // the file shrank
    have += got;
  }
  out.resize(have);
  // ...then whatever follows (a file growing under us, a /proc file that reports size 0), in
  // chunks, never beyond the cap.
  char chunk[1 << 16];
  for (size_t got; (got = read_some(chunk, sizeof chunk)) > 0;) {
    if (out.size() + got > cap)
      throw Error(path + ": more than the " + mib(cap) + " victor reads for " + file_kind_name(kind));
    out.append(chunk, got);
  }
  return out;
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
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

// Temporaries are NAME.victor-tmp-PID-N: a tag no user names a file with by accident, and the
// pid that tells the sweep whether the writer is still alive.
constexpr const char* kTmpTag = ".victor-tmp-";

std::string temporary_name(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  return path + kTmpTag + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

void fail_write(const std::string& path, const std::string& tmp, int err) {
  std::remove(tmp.c_str());
  throw Error(path + ": write failed (" + std::string(err ? std::strerror(err) : "disk full?") +
              "); the previous file, if any, is unchanged");
}

}  // namespace

void write_file_atomic_streamed(const std::string& path,
                                const std::function<void(std::ostream&)>& write) {
  fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string tmp = temporary_name(path);
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
      fail_write(path, tmp, err);
    }
    out.close();
    if (out.fail()) fail_write(path, tmp, errno);
  }
  sync_path(tmp);
  try {
    note_folder_change(target.has_parent_path() ? target.parent_path().string() : ".");
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw Error(path + ": cannot rename temporary file: " + ec.message());
  }
  sync_path(target.has_parent_path() ? target.parent_path().string() : ".");
}

bool is_victor_temporary(const std::string& name) {
  const size_t at = name.rfind(kTmpTag);
  if (at == std::string::npos || at == 0) return false;
  const std::string tail = name.substr(at + std::strlen(kTmpTag));
  const size_t dash = tail.find('-');
  if (dash == 0 || dash == std::string::npos || dash + 1 == tail.size()) return false;
  return tail.find_first_not_of("0123456789-") == std::string::npos && tail.find('-', dash + 1) == std::string::npos;
}

int remove_stale_temporaries(const std::string& dir) {
  std::vector<fs::path> stale;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!is_victor_temporary(name) || !it->is_regular_file(ec)) continue;
    const std::string tail = name.substr(name.rfind(kTmpTag) + std::strlen(kTmpTag));
    const long pid = std::strtol(tail.c_str(), nullptr, 10);
    // Alive (ours included: another thread may be writing it) or not ours to signal: kept.
    if (pid <= 0 || ::kill(pid_t(pid), 0) == 0 || errno == EPERM) continue;
    stale.push_back(it->path());
  }
  int removed = 0;
  for (auto& p : stale) removed += fs::remove(p, ec) ? 1 : 0;
  return removed;
}

// --- model folders ---

bool holds_model(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const char* f : {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.model"})
    if (fs::exists(fs::path(dir) / f, ec)) return true;
  return false;
}

void refuse_existing_model(const std::string& dir, bool overwrite, const std::string& option) {
  if (overwrite || !holds_model(dir)) return;
  // A folder an interrupted write left marked incomplete holds no model that loads: writing it
  // again (a training run killed inside its first checkpoint, rerun) loses nothing.
  std::error_code ec;
  if (fs::exists(fs::path(dir) / kIncompleteMarker, ec)) return;
  throw Error(option + " " + dir +
              ": the folder already holds a model; pass --overwrite to replace it (the old model stays "
              "intact until the new one is complete)");
}

namespace {
std::mutex g_open_mutex;
// Folders with a model write in progress in this process, and whether the marker is down yet.
std::map<std::string, bool> g_open_writes;

std::string folder_key(const std::string& dir) {
  std::error_code ec;
  auto p = fs::weakly_canonical(fs::absolute(dir), ec);
  return ec ? fs::absolute(dir).lexically_normal().string() : p.string();
}

// Puts the marker down before the first file of an open write is replaced (called with the
// lock held): a write that fails before replacing anything leaves the old model untouched and
// loadable.
void mark_locked(const std::string& key, bool& marked) {
  if (marked) return;
  const std::string marker = (fs::path(key) / kIncompleteMarker).string();
  {
    std::ofstream out(marker, std::ios::trunc);
    out << "victor is writing a model into this folder (pid " << ::getpid()
        << "); if this file stays, the write was interrupted and the folder must be written again\n";
    if (!out) throw Error(key + ": cannot write " + marker);
  }
  sync_path(marker);
  sync_path(key);
  marked = true;
}
}  // namespace

void note_folder_change(const std::string& dir) {
  const std::string key = folder_key(dir.empty() ? "." : dir);
  std::lock_guard<std::mutex> lock(g_open_mutex);
  auto it = g_open_writes.find(key);
  if (it != g_open_writes.end()) mark_locked(key, it->second);
}

namespace {
// Stop signals (Ctrl-C, the launcher's SIGTERM when another rank failed, a closed terminal)
// wait while a model write is open: the write ends whole, then the signal acts as it would have.
// A handler, not a signal mask: LibTorch's pool threads would take a masked signal's default.
constexpr int kStopSignals[] = {SIGINT, SIGTERM, SIGHUP};
std::mutex g_defer_mutex;
int g_defer_depth = 0;
struct sigaction g_old_actions[3];
volatile sig_atomic_t g_deferred_signal = 0;
void on_deferred_signal(int sig) { g_deferred_signal = sig; }

void defer_stop_signals() {
  std::lock_guard<std::mutex> lock(g_defer_mutex);
  if (g_defer_depth++ > 0) return;
  struct sigaction sa {};
  sa.sa_handler = on_deferred_signal;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kStopSignals[i], &sa, &g_old_actions[i]);
}

void release_stop_signals() {
  std::lock_guard<std::mutex> lock(g_defer_mutex);
  if (--g_defer_depth > 0) return;
  for (int i = 0; i < 3; ++i) sigaction(kStopSignals[i], &g_old_actions[i], nullptr);
  const int sig = g_deferred_signal;
  g_deferred_signal = 0;
  if (sig) raise(sig);  // to the handler that was there before (by default: the process ends)
}
}  // namespace

ModelFolderWrite::ModelFolderWrite(const std::string& dir) : dir_(folder_key(dir)) {
  std::lock_guard<std::mutex> lock(g_open_mutex);
  if (g_open_writes.count(dir_)) return;  // an outer write of the same folder owns the marker
  g_open_writes.emplace(dir_, false);
  owner_ = true;
  defer_stop_signals();
}

void ModelFolderWrite::commit() {
  if (!owner_ || committed_) return;
  std::lock_guard<std::mutex> lock(g_open_mutex);
  if (g_open_writes[dir_]) {
    std::error_code ec;
    fs::remove(fs::path(dir_) / kIncompleteMarker, ec);
    if (ec) throw Error(dir_ + ": cannot remove " + kIncompleteMarker + ": " + ec.message());
    sync_path(dir_);
  }
  g_open_writes.erase(dir_);
  committed_ = true;
  release_stop_signals();
}

ModelFolderWrite::~ModelFolderWrite() {
  if (!owner_ || committed_) return;
  {
    std::lock_guard<std::mutex> lock(g_open_mutex);
    g_open_writes.erase(dir_);  // the marker, if down, stays: some files were replaced
  }
  release_stop_signals();
}

void check_model_folder_complete(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(fs::path(dir) / kIncompleteMarker, ec))
    throw Error(dir + ": an interrupted write left this model folder incomplete (" + kIncompleteMarker +
                " is present); write the model again");
}

// --- outputs ---

bool same_path(const std::string& a, const std::string& b) {
  std::error_code ec;
  if (fs::exists(a, ec) && fs::exists(b, ec)) return fs::equivalent(a, b, ec);
  return fs::weakly_canonical(fs::absolute(a), ec) == fs::weakly_canonical(fs::absolute(b), ec);
}

void refuse_output_over_inputs(const std::string& option, const std::string& out,
                               const std::vector<std::string>& inputs) {
  if (out.empty()) return;
  const fs::path o(out);
  std::error_code ec;
  if (fs::is_directory(o, ec)) throw Error(option + " " + out + ": is a folder, not a file");
  for (auto& in : inputs)
    if (!in.empty() && same_path(out, in))
      throw Error(option + " " + out + ": is one of this command's inputs (" + in + "); choose another file");
  const fs::path parent = fs::absolute(o).parent_path();
  if (holds_model(parent.string()) && fs::exists(o, ec))
    throw Error(option + " " + out + ": would replace a file inside the model folder " + parent.string() +
                "; write it elsewhere");
}

}  // namespace victor
