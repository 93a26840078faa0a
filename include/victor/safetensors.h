// safetensors reader (memory-mapped) and writer, single file and sharded.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "victor/safetensors_header.h"

namespace victor {

// One memory-mapped safetensors file. Tensors handed out as F32; F32 data is not copied
// (copy-on-write mapping), F16/BF16 are converted.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return infos_; }
  bool contains(const std::string& name) const { return infos_.count(name) > 0; }
  torch::Tensor load(const std::string& name) const;  // float32
  // In the stored dtype; memory-mapped without a copy when aligned.
  torch::Tensor load_raw(const std::string& name) const;
  // Drops this process's mapping of the tensor's file pages (whole pages inside its bytes only),
  // once a copy of it is all that is used: without it a loaded model's resident memory counted
  // each weight twice, the copy and the file's pages. The data stays valid: a later read of a
  // tensor from the file faults its pages in again. Only for tensors never written in place.
  void release_pages(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> map_;
  size_t data_offset_ = 0;
  std::map<std::string, TensorInfo> infos_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint folder: model.safetensors, or the shards that
// model.safetensors.index.json lists, or any *.safetensors in the folder. A tensor stored in two
// files, or in another shard than the index says, is refused.
class TensorStore {
 public:
  explicit TensorStore(const std::string& dir);
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  torch::Tensor load(const std::string& name) const;      // float32
  torch::Tensor load_raw(const std::string& name) const;  // stored dtype
  void release_pages(const std::string& name) const;      // SafetensorsFile::release_pages
  const TensorInfo& info(const std::string& name) const;
  std::string file_of(const std::string& name) const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
};

// F32/F16/BF16 cast every tensor; Native keeps each one's own dtype (F32, BF16, I8, ...).
enum class SaveDtype { F32, F16, BF16, Native };

// Writes tensors (any float dtype, any device) as one file, atomically.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      SaveDtype dtype = SaveDtype::F32,
                      const std::map<std::string, std::string>& metadata = {});
// Writes model.safetensors, or shards + model.safetensors.index.json when the total exceeds
// max_shard_bytes (0 = never shard).
void save_checkpoint_tensors(const std::string& dir,
                             const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                             size_t max_shard_bytes = 0, SaveDtype dtype = SaveDtype::F32);

}  // namespace victor
