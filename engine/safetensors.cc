#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include <nlohmann/json.hpp>

namespace moemesh {
namespace {

using json = nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";

absl::StatusOr<DType> ParseDType(std::string_view s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError("unsupported");
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// True (and *out set) for a non-negative JSON integer that fits in int64_t.
bool GetNonNegativeInt(const json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    uint64_t v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = v;
    return true;
  }
  if (j.is_number_integer()) {
    int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}

// Parses one tensor entry of the header. `data_size` is the length of the data region.
absl::Status ParseTensorEntry(const std::string& path, const std::string& name, const json& entry,
                              const uint8_t* data_region, uint64_t data_size, TensorInfo* t) {
  auto err = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': ", what));
  };
  if (!entry.is_object()) return err("header entry is not a JSON object");

  auto dt = entry.find("dtype");
  if (dt == entry.end() || !dt->is_string()) return err("missing or non-string 'dtype'");
  const std::string dtype_name = dt->get<std::string>();
  absl::StatusOr<DType> dtype = ParseDType(dtype_name);
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported dtype '", dtype_name,
                                                   "' for tensor '", name,
                                                   "' (supported: F32, F16, BF16)"));
  }

  auto sh = entry.find("shape");
  if (sh == entry.end() || !sh->is_array()) return err("missing or non-array 'shape'");
  std::vector<int64_t> shape;
  shape.reserve(sh->size());
  // numel x element size, checked against overflow.
  uint64_t nbytes = DTypeSize(*dtype);
  bool overflow = false;
  for (const json& d : *sh) {
    uint64_t v;
    if (!GetNonNegativeInt(d, &v)) {
      return err(absl::StrCat("shape ", d.dump(), " entry is not a non-negative integer"));
    }
    shape.push_back(static_cast<int64_t>(v));
    if (__builtin_mul_overflow(nbytes, v, &nbytes)) overflow = true;
  }
  if (overflow) {
    return err(absl::StrCat("shape ", ShapeToString(shape), " is too large"));
  }

  auto off = entry.find("data_offsets");
  if (off == entry.end() || !off->is_array() || off->size() != 2) {
    return err("missing 'data_offsets' or it is not a [begin, end] pair");
  }
  uint64_t begin, end;
  if (!GetNonNegativeInt((*off)[0], &begin) || !GetNonNegativeInt((*off)[1], &end)) {
    return err(absl::StrCat("data_offsets ", off->dump(), " are not non-negative integers"));
  }
  if (begin > end) {
    return err(absl::StrCat("data_offsets [", begin, ", ", end, ") has begin > end"));
  }
  if (end > data_size) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: tensor '", name, "' needs bytes [",
                                            begin, ", ", end, ") but data region has ", data_size));
  }
  if (end - begin != nbytes) {
    return err(absl::StrCat("data_offsets [", begin, ", ", end, ") hold ", end - begin,
                            " bytes but shape ", ShapeToString(shape), " of ",
                            std::string(DTypeName(*dtype)), " needs ", nbytes));
  }

  t->name = name;
  t->dtype = *dtype;
  t->shape = std::move(shape);
  t->data = data_region + begin;
  t->nbytes = static_cast<size_t>(nbytes);
  t->file = path;
  return absl::OkStatus();
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    std::string msg = absl::StrCat(path, ": cannot open: ", std::strerror(e));
    if (e == ENOENT) return absl::NotFoundError(msg);
    if (e == EACCES) return absl::PermissionDeniedError(msg);
    return absl::UnavailableError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat(path, ": fstat failed: ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": truncated: file is ", size,
                                            " bytes, shorter than the 8-byte header length"));
  }

  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // The mapping keeps the file alive.
  if (map == MAP_FAILED) {
    return absl::UnavailableError(absl::StrCat(path, ": mmap failed: ", std::strerror(map_errno)));
  }
  f->map_ = map;
  f->size_ = size;
  const uint8_t* bytes = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > size - 8) {
    return absl::DataLossError(
        absl::StrCat(path, ": header length ", header_len, " exceeds file size ", size));
  }
  const uint8_t* data_region = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(path, ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::DataLossError(absl::StrCat(path, ": header is not a JSON object"));
  }

  try {
    f->tensors_.reserve(header.size());
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == kMetadataKey) {
        if (it.value().is_object()) {
          for (auto m = it.value().begin(); m != it.value().end(); ++m) {
            if (m.value().is_string()) f->metadata_[m.key()] = m.value().get<std::string>();
          }
        } else if (!it.value().is_null()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": '__metadata__' is not a JSON object"));
        }
        continue;
      }
      TensorInfo t;
      absl::Status s = ParseTensorEntry(path, it.key(), it.value(), data_region, data_size, &t);
      if (!s.ok()) return s;
      f->tensors_.push_back(std::move(t));
    }
  } catch (const std::exception& e) {  // Defensive: types are checked before every get<>.
    return absl::InvalidArgumentError(absl::StrCat(path, ": bad header: ", e.what()));
  }
  // nlohmann::json objects iterate in key order already; sort anyway so Find can bisect
  // regardless of the JSON library's object type.
  std::sort(f->tensors_.begin(), f->tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = std::lower_bound(
      tensors_.begin(), tensors_.end(), name,
      [](const TensorInfo& t, std::string_view n) { return std::string_view(t.name) < n; });
  if (it == tensors_.end() || it->name != name) return nullptr;
  return &*it;
}

// ---------------------------------------------------------------------------------------------
// CheckpointReader

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(
    const std::string& dir, std::function<bool(std::string_view name)> want) {
  if (!Exists(dir)) {
    return absl::NotFoundError(absl::StrCat(dir, ": checkpoint directory does not exist"));
  }
  if (!IsDirectory(dir)) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": not a directory"));
  }
  std::unique_ptr<CheckpointReader> r(new CheckpointReader());
  r->dir_ = dir;
  r->want_ = want;
  auto wanted = [&want](std::string_view name) { return !want || want(name); };

  const std::string index_path = JoinPath(dir, kIndexFile);
  const std::string single_path = JoinPath(dir, kSingleFile);

  // Like transformers: a single model.safetensors wins over an index next to it.
  const bool has_single = Exists(single_path);
  if (!has_single && Exists(index_path)) {
    r->sharded_ = true;
    // Read and parse the index.
    std::string text;
    {
      int fd = ::open(index_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        return absl::UnavailableError(
            absl::StrCat(index_path, ": cannot open: ", std::strerror(errno)));
      }
      char buf[1 << 16];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(n));
      int e = errno;
      ::close(fd);
      if (n < 0) {
        return absl::UnavailableError(
            absl::StrCat(index_path, ": read failed: ", std::strerror(e)));
      }
    }
    // shard file -> wanted tensor names in it (std::map: deterministic open order).
    std::map<std::string, std::vector<std::string>> by_shard;
    try {
      json index = json::parse(text);
      if (!index.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": not a JSON object"));
      }
      auto wm = index.find("weight_map");
      if (wm == index.end() || !wm->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": missing field 'weight_map' (an object)"));
      }
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry '",
                                                         it.key(), "' is not a file name string"));
        }
        const std::string shard = it.value().get<std::string>();
        if (shard.empty() || shard[0] == '/' || shard == ".." || shard.rfind("../", 0) == 0 ||
            shard.find("/../") != std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry '",
                                                         it.key(), "' names shard '", shard,
                                                         "' outside the checkpoint directory"));
        }
        if (wanted(it.key())) by_shard[shard].push_back(it.key());
      }
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": not valid JSON: ", e.what()));
    }
    for (auto& [shard, names] : by_shard) {
      const std::string shard_path = JoinPath(dir, shard);
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(shard_path);
      if (!f.ok()) {
        return absl::Status(f.status().code(), absl::StrCat(f.status().message(),
                                                            " (shard listed in ", index_path, ")"));
      }
      for (const std::string& name : names) {
        const TensorInfo* t = (*f)->Find(name);
        if (t == nullptr) {
          return absl::DataLossError(absl::StrCat(shard_path, ": tensor '", name, "' listed in ",
                                                  index_path, " is not in this shard"));
        }
        r->index_.emplace(name, t);
      }
      r->files_.push_back(*std::move(f));
    }
    return r;
  }

  if (has_single) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(single_path);
    if (!f.ok()) return f.status();
    for (const TensorInfo& t : (*f)->tensors()) {
      if (wanted(t.name)) r->index_.emplace(t.name, &t);
    }
    r->files_.push_back(*std::move(f));
    return r;
  }

  return absl::NotFoundError(
      absl::StrCat(dir, ": no ", kSingleFile, " or ", kIndexFile, " in the checkpoint directory"));
}

const TensorInfo* CheckpointReader::Find(std::string_view name) const {
  if (dummy_) return FindDummy(name, /*make=*/true);
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

absl::StatusOr<const TensorInfo*> CheckpointReader::Get(std::string_view name,
                                                        const std::vector<int64_t>& shape) const {
  // Dummy readers check the shape before making the values.
  const TensorInfo* t = dummy_ ? FindDummy(name, /*make=*/false) : Find(name);
  if (t == nullptr) {
    std::string msg = absl::StrCat(dir_, ": missing tensor '", std::string(name), "'");
    if (want_ && !want_(name)) absl::StrAppend(&msg, " (not selected by this reader's filter)");
    return absl::NotFoundError(msg);
  }
  if (t->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(t->file, ": tensor '", std::string(name),
                                                   "' has shape ", ShapeToString(t->shape),
                                                   ", config.json implies ", ShapeToString(shape)));
  }
  if (dummy_) {
    t = FindDummy(name, /*make=*/true);
    if (t == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(
          dir_, ": no memory for the values of tensor '", std::string(name), "'"));
    }
  }
  return t;
}

std::vector<std::string> CheckpointReader::Names() const {
  std::vector<std::string> names;
  if (dummy_) {
    names.reserve(dummy_tensors_.size());
    for (const auto& [name, t] : dummy_tensors_) names.push_back(name);
    return names;
  }
  names.reserve(index_.size());
  for (const auto& [name, t] : index_) names.push_back(name);
  return names;
}

std::vector<std::string> CheckpointReader::open_files() const {
  std::vector<std::string> paths;
  paths.reserve(files_.size());
  for (const auto& f : files_) paths.push_back(f->path());
  return paths;
}

}  // namespace moemesh
