// Reading JSON files of checkpoints (config.json, generation_config.json): the whole file, one
// object, and typed access to its fields that keeps the first error.
#ifndef MOEMESH_ENGINE_JSON_FIELDS_H_
#define MOEMESH_ENGINE_JSON_FIELDS_H_

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include <nlohmann/json.hpp>

namespace moemesh {

// The file's bytes. NotFound if it does not exist, Unavailable for other open/read failures.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

// `text` parsed as one JSON object; InvalidArgument (naming `path`) otherwise.
absl::StatusOr<nlohmann::json> ParseObject(std::string_view text, const std::string& path);

// ReadWholeFile, then ParseObject.
absl::StatusOr<nlohmann::json> ReadObjectFile(const std::string& path);

// Typed field access on a JSON object. The first error is kept in status(); accessors return
// a harmless default after an error, so callers read every field and check once at the end.
class Fields {
 public:
  // `prefix` is prepended to key names in messages ("rope_parameters.").
  Fields(const nlohmann::json& obj, const std::string& path, std::string prefix = "")
      : obj_(obj), path_(path), prefix_(std::move(prefix)) {}

  const absl::Status& status() const { return status_; }
  bool ok() const { return status_.ok(); }

  // Present and not null.
  bool Has(const char* key) const {
    auto it = obj_.find(key);
    return it != obj_.end() && !it->is_null();
  }

  void Fail(const std::string& what) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(absl::StrCat(path_, ": ", what));
  }
  // Keeps `s` if no error was recorded yet.
  void Merge(const absl::Status& s) {
    if (status_.ok()) status_ = s;
  }

  // Required integer.
  int64_t Int(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end()) {
      Fail(absl::StrCat("missing field '", prefix_, key, "'"));
      return 0;
    }
    return AsInt(key, *it).value_or(0);
  }

  // Optional integer: absent or null -> nullopt.
  std::optional<int64_t> OptInt(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return std::nullopt;
    return AsInt(key, *it);
  }

  std::optional<double> OptNumber(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return std::nullopt;
    return AsNumber(key, *it);
  }

  std::optional<bool> OptBool(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return std::nullopt;
    if (!it->is_boolean()) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be a boolean"));
      return std::nullopt;
    }
    return it->get<bool>();
  }

  std::optional<std::string> OptString(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return std::nullopt;
    if (!it->is_string()) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be a string"));
      return std::nullopt;
    }
    return it->get<std::string>();
  }

  // Absent or null -> nullptr; otherwise must be an object.
  const nlohmann::json* OptObject(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    if (!it->is_object()) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be an object"));
      return nullptr;
    }
    return &*it;
  }

  std::vector<int64_t> IntList(const char* key) {
    std::vector<int64_t> out;
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return out;
    if (!it->is_array()) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be a list of integers"));
      return out;
    }
    for (const nlohmann::json& v : *it) {
      if (!v.is_number_integer() || !FitsInt64(v)) {
        Fail(absl::StrCat("field '", prefix_, key, "' must be a list of integers"));
        return {};
      }
      out.push_back(v.get<int64_t>());
    }
    return out;
  }

  std::optional<int32_t> OptTokenId(const char* key) {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return std::nullopt;
    if (!IsTokenId(*it)) {
      Fail(absl::StrCat("field '", prefix_, key,
                        "' must be a token id (an integer in [0, 2^31)) or null"));
      return std::nullopt;
    }
    return static_cast<int32_t>(it->get<int64_t>());
  }

  // An int, a list of ints, or null/absent (-> empty).
  std::vector<int32_t> TokenIds(const char* key) {
    std::vector<int32_t> out;
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return out;
    auto fail = [&] {
      Fail(absl::StrCat("field '", prefix_, key,
                        "' must be an integer, a list of integers, or null"));
      return std::vector<int32_t>();
    };
    if (it->is_array()) {
      for (const nlohmann::json& v : *it) {
        if (!IsTokenId(v)) return fail();
        out.push_back(static_cast<int32_t>(v.get<int64_t>()));
      }
      return out;
    }
    if (!IsTokenId(*it)) return fail();
    out.push_back(static_cast<int32_t>(it->get<int64_t>()));
    return out;
  }

  // Checks `value >= min` for a field already read.
  void CheckAtLeast(const char* key, int64_t value, int64_t min) {
    if (ok() && value < min) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be >= ", min, ", got ", value));
    }
  }

 private:
  static bool FitsInt64(const nlohmann::json& v) {
    return !v.is_number_unsigned() ||
           v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  }

  static bool IsTokenId(const nlohmann::json& v) {
    if (!v.is_number_integer() || !FitsInt64(v)) return false;
    int64_t x = v.get<int64_t>();
    return x >= 0 && x <= std::numeric_limits<int32_t>::max();
  }

  std::optional<int64_t> AsInt(const char* key, const nlohmann::json& v) {
    if (!v.is_number_integer() || !FitsInt64(v)) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be an integer"));
      return std::nullopt;
    }
    return v.get<int64_t>();
  }

  std::optional<double> AsNumber(const char* key, const nlohmann::json& v) {
    if (!v.is_number()) {
      Fail(absl::StrCat("field '", prefix_, key, "' must be a number"));
      return std::nullopt;
    }
    return v.get<double>();
  }

  const nlohmann::json& obj_;
  const std::string& path_;
  const std::string prefix_;
  absl::Status status_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_JSON_FIELDS_H_
