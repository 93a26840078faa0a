#include "victor/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "victor/error.h"
#include "victor/files.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

namespace {

torch::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "F32") return torch::kFloat32;
  if (dtype == "F16") return torch::kFloat16;
  if (dtype == "BF16") return torch::kBFloat16;
  if (dtype == "F64") return torch::kFloat64;
  if (dtype == "I64") return torch::kInt64;
  if (dtype == "I32") return torch::kInt32;
  if (dtype == "I16") return torch::kInt16;
  if (dtype == "I8") return torch::kInt8;
  if (dtype == "U8") return torch::kUInt8;
  return torch::kBool;
}

}  // namespace

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) munmap(addr, size);
  }
};

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open safetensors file: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(path + ": cannot stat");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file; victor maps only regular safetensors files");
  }
  map_ = std::make_shared<Mapping>();
  map_->size = static_cast<size_t>(st.st_size);
  if (map_->size < 8) {
    ::close(fd);
    throw Error(path + ": truncated safetensors file (" + std::to_string(map_->size) +
                " bytes, no header)");
  }
  // Private writable mapping: weights are used in place (no copy) and training may update them;
  // written pages are copied by the kernel, the file never changes.
  map_->addr = mmap(nullptr, map_->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_->addr == MAP_FAILED) throw Error(path + ": mmap failed: " + std::strerror(errno));

  SafetensorsHeader h = parse_safetensors_header(static_cast<const uint8_t*>(map_->addr), map_->size, path);
  data_offset_ = h.data_offset;
  infos_ = std::move(h.tensors);
  metadata_ = std::move(h.metadata);
}

SafetensorsFile::~SafetensorsFile() = default;

torch::Tensor SafetensorsFile::load(const std::string& name) const {
  auto raw = load_raw(name);
  if (raw.scalar_type() == torch::kFloat32) return raw;
  return raw.to(torch::kFloat32);
}

torch::Tensor SafetensorsFile::load_raw(const std::string& name) const {
  auto it = infos_.find(name);
  if (it == infos_.end()) throw Error(path_ + ": no tensor named '" + name + "'");
  const TensorInfo& info = it->second;
  auto* base = static_cast<uint8_t*>(map_->addr) + data_offset_ + info.begin;
  auto type = scalar_type(info.dtype);
  size_t es = safetensors_dtype_size(info.dtype);
  bool aligned = reinterpret_cast<uintptr_t>(base) % es == 0;
  torch::Tensor raw;
  if (aligned) {
    auto keep = map_;  // the tensor keeps the mapping alive
    raw = torch::from_blob(base, info.shape, [keep](void*) {}, torch::TensorOptions(type));
  } else {
    raw = torch::empty(info.shape, torch::TensorOptions(type));
    std::memcpy(raw.data_ptr(), base, info.end - info.begin);
  }
  return raw;
}

void SafetensorsFile::release_pages(const std::string& name) const {
  auto it = infos_.find(name);
  if (it == infos_.end()) return;
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t base = reinterpret_cast<uintptr_t>(map_->addr) + data_offset_;
  const uintptr_t begin = (base + it->second.begin + page - 1) / page * page;
  const uintptr_t end = (base + it->second.end) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);  // advisory
}

TensorStore::TensorStore(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error(dir + ": model folder not found");
  std::vector<std::string> paths;
  fs::path index = fs::path(dir) / "model.safetensors.index.json";
  fs::path single = fs::path(dir) / "model.safetensors";
  std::map<std::string, std::string> declared;  // tensor -> shard file (from the index)
  if (fs::exists(index)) {
    declared = parse_safetensors_index(read_file(index.string(), FileKind::Json), index.string());
    std::set<std::string> shards;
    for (auto& [t, f] : declared) shards.insert(f);
    for (auto& s : shards) {
      if (!fs::is_regular_file(fs::path(dir) / s))
        throw Error(index.string() + ": shard '" + s + "' listed but missing");
      paths.push_back((fs::path(dir) / s).string());
    }
  } else if (fs::exists(single)) {
    paths.push_back(single.string());
  } else {
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") paths.push_back(e.path().string());
    std::sort(paths.begin(), paths.end());
    if (paths.empty()) throw Error(dir + ": no *.safetensors files in model folder");
  }
  for (auto& p : paths) {
    files_.push_back(std::make_unique<SafetensorsFile>(p));
    for (auto& [name, info] : files_.back()->tensors()) {
      (void)info;
      auto [it, fresh] = where_.emplace(name, files_.size() - 1);
      if (!fresh)
        throw Error(dir + ": tensor '" + name + "' is stored twice, in " + files_[it->second]->path() + " and " + p);
    }
  }
  for (auto& [t, f] : declared) {
    auto it = where_.find(t);
    if (it == where_.end())
      throw Error(index.string() + ": tensor '" + t + "' listed in shard '" + f + "' but not found there");
    if (fs::path(files_[it->second]->path()).filename() != f)
      throw Error(index.string() + ": tensor '" + t + "' listed in shard '" + f + "' but stored in " +
                  files_[it->second]->path());
  }
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  for (auto& [n, i] : where_) {
    (void)i;
    out.push_back(n);
  }
  return out;
}

torch::Tensor TensorStore::load(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error("no tensor named '" + name + "' in checkpoint");
  return files_[it->second]->load(name);
}

torch::Tensor TensorStore::load_raw(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error("no tensor named '" + name + "' in checkpoint");
  return files_[it->second]->load_raw(name);
}

void TensorStore::release_pages(const std::string& name) const {
  auto it = where_.find(name);
  if (it != where_.end()) files_[it->second]->release_pages(name);
}

const TensorInfo& TensorStore::info(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error("no tensor named '" + name + "' in checkpoint");
  return files_[it->second]->tensors().at(name);
}

std::string TensorStore::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? std::string() : files_[it->second]->path();
}

namespace {

torch::ScalarType stored_type(SaveDtype dtype, torch::ScalarType own) {
  switch (dtype) {
    case SaveDtype::F32: return torch::kFloat32;
    case SaveDtype::F16: return torch::kFloat16;
    case SaveDtype::BF16: return torch::kBFloat16;
    case SaveDtype::Native: break;
  }
  if (own == torch::kBFloat16 || own == torch::kFloat16 || own == torch::kInt8 || own == torch::kUInt8) return own;
  return torch::kFloat32;
}

const char* dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat16: return "F16";
    case torch::kBFloat16: return "BF16";
    case torch::kInt8: return "I8";
    case torch::kUInt8: return "U8";
    default: return "F32";
  }
}

// Streams the file: the header from shapes and dtypes, then one tensor at a time (converted and
// written, then released), so saving never holds a second copy of the model.
void write_safetensors(std::ostream& out,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       SaveDtype dtype, const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  size_t offset = 0;
  for (auto& [n, t] : tensors) {
    if (!t.defined()) throw Error("cannot save undefined tensor '" + n + "'");
    torch::ScalarType st = stored_type(dtype, t.scalar_type());
    size_t nbytes = size_t(t.numel()) * c10::elementSize(st);
    header[n] = {{"dtype", dtype_name(st)}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  char len_bytes[8];
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.write(len_bytes, 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (auto& [n, t] : tensors) {
    auto c = t.detach().to(torch::kCPU, stored_type(dtype, t.scalar_type())).contiguous();
    out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
    if (!out)
      throw Error(std::string("write failed (") + (errno ? std::strerror(errno) : "disk full?") + ") while saving tensor '" +
                  n + "'; the previous file, if any, is unchanged");
  }
}

}  // namespace

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      SaveDtype dtype, const std::map<std::string, std::string>& metadata) {
  write_file_atomic_streamed(path, [&](std::ostream& out) { write_safetensors(out, tensors, dtype, metadata); });
}

void save_checkpoint_tensors(const std::string& dir,
                             const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                             size_t max_shard_bytes, SaveDtype dtype) {
  fs::create_directories(dir);
  auto bytes_of = [&](const torch::Tensor& t) {
    return size_t(t.numel()) * c10::elementSize(stored_type(dtype, t.scalar_type()));
  };
  size_t total = 0;
  for (auto& [n, t] : tensors) total += bytes_of(t);
  std::map<std::string, std::string> meta{{"format", "pt"}};
  if (max_shard_bytes == 0 || total <= max_shard_bytes) {
    save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, dtype, meta);
    std::error_code ec;
    note_folder_change(dir);
    fs::remove(fs::path(dir) / "model.safetensors.index.json", ec);
    return;
  }
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> shards(1);
  size_t cur = 0;
  for (auto& nt : tensors) {
    size_t b = bytes_of(nt.second);
    if (cur > 0 && cur + b > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(nt);
    cur += b;
  }
  json weight_map = json::object();
  char buf[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    save_safetensors((fs::path(dir) / buf).string(), shards[i], dtype, meta);
    for (auto& [n, t] : shards[i]) {
      (void)t;
      weight_map[n] = buf;
    }
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2));
  std::error_code ec;
  note_folder_change(dir);
  fs::remove(fs::path(dir) / "model.safetensors", ec);
}

}  // namespace victor
