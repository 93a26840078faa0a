// How victor touches a user's files: bounded reads of regular files only, atomic writes under
// temporary names only victor makes, model folders written as a whole, outputs that never land
// on an input. No torch: the fuzz build links files.cpp alone.
#pragma once
#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

namespace victor {

// What a file is read as: each kind has its own size cap (docs/reliability.md lists them).
enum class FileKind {
  Json,       // config.json, preprocessor_config.json, tokenizer_config.json, index, trainer state
  Tokenizer,  // tokenizer.model (SentencePiece)
  Image,      // an encoded PNG / JPEG / BMP
  Dataset,    // LLaVA JSON, questions / answers JSONL, a text corpus
  Array,      // .npy
  Log,        // a child process's log
};
uint64_t max_file_bytes(FileKind kind);
const char* file_kind_name(FileKind kind);

// The whole file. Refused by name: anything but a regular file (devices, FIFOs, sockets,
// folders; links are followed first) and a file larger than its kind's cap. Never blocks on a
// FIFO and never reads more than the cap, even from a file that grows while it is read.
std::string read_file(const std::string& path, FileKind kind);

// Writes `bytes` to `path` atomically: a temporary file in the same folder, then rename.
void write_file_atomic(const std::string& path, const std::string& bytes);
// The same, with the content streamed by `write` (large checkpoints are never held twice).
void write_file_atomic_streamed(const std::string& path,
                                const std::function<void(std::ostream&)>& write);
// Removes the temporaries that a killed victor process left in dir: only names of the form
// NAME.victor-tmp-PID-N that write_file_atomic makes, and only where process PID is gone.
// Returns how many.
int remove_stale_temporaries(const std::string& dir);
// True for a name write_file_atomic gives its temporaries.
bool is_victor_temporary(const std::string& filename);

// --- model folders ---
// A folder holds a model when it has config.json, weights or tokenizer.model.
bool holds_model(const std::string& dir);
// Refuses to write a model into `dir` when it already holds one, unless `overwrite`; `option`
// names the flag in the message (e.g. "--out"). A folder marked incomplete is not refused.
void refuse_existing_model(const std::string& dir, bool overwrite, const std::string& option);

// Writing a model into a folder as one unit: the marker file .victor-incomplete exists from
// before the first file is replaced (write_file_atomic, or note_folder_change before a removal)
// until commit(), and loading a marked folder is refused. A kill at any instant leaves the old
// model, the new one, or a folder that says it is incomplete: never a mix that loads. A write
// that fails before replacing anything leaves no marker. Nested writes of the same folder
// (Vlm::save inside a training checkpoint) share the outer one's. While a write is open, SIGINT,
// SIGTERM and SIGHUP wait for it to end (commit or destruction) and then act as they would have:
// a stopped run keeps its last checkpoint whole (only SIGKILL can still cut a write).
class ModelFolderWrite {
 public:
  explicit ModelFolderWrite(const std::string& dir);
  ~ModelFolderWrite();  // without commit(): the marker stays (the folder is incomplete)
  void commit();
  ModelFolderWrite(const ModelFolderWrite&) = delete;
  ModelFolderWrite& operator=(const ModelFolderWrite&) = delete;

 private:
  std::string dir_;
  bool owner_ = false, committed_ = false;
};
constexpr const char* kIncompleteMarker = ".victor-incomplete";
// Called before a file in `dir` is replaced or removed: puts the marker down when a model write
// into `dir` is open.
void note_folder_change(const std::string& dir);
// Throws when an interrupted write left `dir` marked incomplete.
void check_model_folder_complete(const std::string& dir);

// --- outputs ---
// The two paths name the same file or folder: by inode when both exist (links included), else by
// their normalized absolute forms.
bool same_path(const std::string& a, const std::string& b);
// Refuses an output file (`option` names its flag) that is one of the command's inputs (the same
// file by path or by inode) or that would replace a file inside a model folder.
void refuse_output_over_inputs(const std::string& option, const std::string& out,
                               const std::vector<std::string>& inputs);

}  // namespace victor
