// Read-only access to Hugging Face checkpoints stored as safetensors: a single file
// (SafetensorsFile, mmap'ed) and a checkpoint directory, single-file or sharded
// (CheckpointReader), optionally restricted to a subset of tensor names.
//
// Safetensors layout: an 8-byte little-endian u64 header length N, N bytes of JSON header
//   {"NAME": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {...}}
// then the data region; offsets are relative to the start of the data region.
//
// Tensor data pointers point straight into the mapping. The safetensors writers align the
// data region to 8 bytes, but nothing in the format guarantees that a tensor's data is
// aligned for its element type: consumers that need alignment should copy (memcpy / ToF32).
#ifndef MOEMESH_ENGINE_SAFETENSORS_H_
#define MOEMESH_ENGINE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/dtype.h"

namespace moemesh {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // Points into the mmap'ed file; valid while the reader lives.
  size_t nbytes = 0;
  std::string file;  // Path of the file it came from (for error messages).

  // Product of the shape (1 for a scalar, shape []).
  int64_t numel() const;
};

// "[a, b, c]".
std::string ShapeToString(const std::vector<int64_t>& shape);

// One .safetensors file, mmap'ed read-only (MAP_PRIVATE, PROT_READ). The header is fully
// validated at Open: every tensor has a supported dtype (F32/F16/BF16), a non-negative shape,
// and data_offsets inside the data region whose length equals numel x dtype size.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();  // munmap

  // nullptr if absent.
  const TensorInfo* Find(std::string_view name) const;
  // Sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The "__metadata__" string map (empty if absent; non-string values are skipped).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  size_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;

  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: `model.safetensors`, or shards listed by
// `model.safetensors.index.json` ("weight_map": name -> shard file); when both are present the
// single file is used, as transformers does. In the sharded case the names are those of the
// weight_map (each must be present in its shard; other tensors in a shard are ignored). `want`
// (optional) selects tensor names: shards holding none of the wanted tensors are not opened, and
// Find() of an unwanted name returns nullptr -- this is how an expert worker loads only its own
// (layer, expert) shards.
class CheckpointReader {
 public:
  static constexpr const char* kSingleFile = "model.safetensors";
  static constexpr const char* kIndexFile = "model.safetensors.index.json";

  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(
      const std::string& dir, std::function<bool(std::string_view name)> want = nullptr);

  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  // nullptr if absent or not wanted.
  const TensorInfo* Find(std::string_view name) const;
  // Error if missing ("<dir>: missing tensor 'NAME'") or if the shape differs
  // ("<file>: tensor 'NAME' has shape [a, b], config.json implies [c, d]").
  absl::StatusOr<const TensorInfo*> Get(std::string_view name,
                                        const std::vector<int64_t>& shape) const;
  // All wanted tensor names, sorted.
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }

  // True for a reader of random weights (--load_format=dummy).
  bool dummy() const { return dummy_; }
  // True when the checkpoint came with model.safetensors.index.json.
  bool sharded() const { return sharded_; }
  // The safetensors files actually opened (those holding at least one wanted tensor).
  size_t num_open_files() const { return files_.size(); }
  std::vector<std::string> open_files() const;

 private:
  CheckpointReader() = default;

  std::string dir_;
  bool sharded_ = false;
  bool dummy_ = false;
  std::function<bool(std::string_view)> want_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*, std::less<>> index_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_SAFETENSORS_H_
