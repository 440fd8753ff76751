// Where a worker's tensors live and its ops run: the host CPU or a CUDA GPU.
#ifndef MOEMESH_ENGINE_DEVICE_H_
#define MOEMESH_ENGINE_DEVICE_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace moemesh {

struct Device {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;  // GPU ordinal (kCuda)

  bool is_cpu() const { return kind == Kind::kCpu; }
  // "cpu", "cuda:0".
  std::string ToString() const;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

// "cpu", "cuda" (= cuda:0) or "cuda:N"; InvalidArgument otherwise.
absl::StatusOr<Device> ParseDevice(std::string_view s);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_DEVICE_H_
