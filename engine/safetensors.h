// Read-only access to Hugging Face checkpoints stored as safetensors: a single file
// (SafetensorsFile, mmap'ed) and a checkpoint directory, single-file or sharded
// (CheckpointReader), optionally restricted to a subset of tensor names. A CheckpointReader can
// also be a dummy one (OpenDummy): every tensor of a config's checkpoint, with random values
// made when first asked for (vLLM's --load-format=dummy), for benchmarks without the weights.
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
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/arch.h"
#include "engine/config.h"
#include "engine/dtype.h"

namespace moemesh {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Points into the mmap'ed file (dummy readers: their own buffer); valid while the reader
  // lives.
  const void* data = nullptr;
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
//
// Find(), Get() and Names() are thread-safe (const, and dummy readers make tensors under a mutex).
class CheckpointReader {
 public:
  static constexpr const char* kSingleFile = "model.safetensors";
  static constexpr const char* kIndexFile = "model.safetensors.index.json";

  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(
      const std::string& dir, std::function<bool(std::string_view name)> want = nullptr);

  // A reader of random weights made from the config alone: it holds exactly the tensors
  // CheckpointWeights(cfg, arch) lists (the names and shapes of a Hugging Face checkpoint of
  // that family; the first cfg.num_hidden_layers layers), all of type `dtype`, restricted by
  // `want` as Open() does. Nothing is allocated up front: a tensor's values are made on its first
  // Find()/Get(), deterministically from (seed, name) alone (any process, any `want`, any
  // order gives the same bytes), and kept for the reader's lifetime. Values: norm weights
  // ("...norm.weight") 1; biases 0; model.embed_tokens uniform in [-0.05, 0.05]; every other
  // matrix uniform in [-a, a] with a = 1 / sqrt(in_features) (its last dimension), so that
  // activations stay O(1) through any number of layers. InvalidArgument for a config with a
  // non-positive size.
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> OpenDummy(
      const ModelConfig& cfg, const ArchSpec& arch, DType dtype = DType::kBF16, uint64_t seed = 0,
      std::function<bool(std::string_view name)> want = nullptr);

  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  // nullptr if absent or not wanted. Dummy readers make the tensor's values here on first use
  // (for the largest tensors of a big model, ~0.1-1 s).
  const TensorInfo* Find(std::string_view name) const;
  // Error if missing ("<dir>: missing tensor 'NAME'") or if the shape differs
  // ("<file>: tensor 'NAME' has shape [a, b], config.json implies [c, d]").
  absl::StatusOr<const TensorInfo*> Get(std::string_view name,
                                        const std::vector<int64_t>& shape) const;
  // All wanted tensor names, sorted.
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }

  // True when the checkpoint came with model.safetensors.index.json.
  bool sharded() const { return sharded_; }
  // True for readers made by OpenDummy (no files: num_open_files() is 0).
  bool dummy() const { return dummy_; }
  // Dummy readers: frees the values already made for every tensor whose name starts with
  // `name_prefix` (a later Find() makes the same values again). For loaders that copy what they
  // read (Linear::Create packs its own copy), so that a big dummy model is not held twice while
  // it loads. The caller must know that nobody still reads those tensors' data (their
  // TensorInfo stays valid, its data is null until made again). No-op for file readers.
  void ReleaseDummyValues(std::string_view name_prefix) const;
  // The safetensors files actually opened (those holding at least one wanted tensor).
  size_t num_open_files() const { return files_.size(); }
  std::vector<std::string> open_files() const;

 private:
  CheckpointReader() = default;

  std::string dir_;
  bool sharded_ = false;
  std::function<bool(std::string_view)> want_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*, std::less<>> index_;

  // Dummy readers only. The map is constant after OpenDummy; each entry's info.data and bytes
  // are set once, under dummy_mu_, by the first Find() of its name.
  struct DummyTensor {
    TensorInfo info;  // info.data is null until made
    std::unique_ptr<void, void (*)(void*)> bytes{nullptr, &std::free};
  };
  // The entry of `name` (nullptr if absent); with `make`, its values made first if need be.
  const TensorInfo* FindDummy(std::string_view name, bool make) const;
  bool dummy_ = false;
  uint64_t seed_ = 0;
  mutable std::mutex dummy_mu_;
  std::map<std::string, std::unique_ptr<DummyTensor>, std::less<>> dummy_tensors_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_SAFETENSORS_H_
