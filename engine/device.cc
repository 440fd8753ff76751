#include "engine/device.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moemesh {

std::string Device::ToString() const {
  return kind == Kind::kCpu ? "cpu" : absl::StrCat("cuda:", index);
}

absl::StatusOr<Device> ParseDevice(std::string_view s) {
  Device d;
  if (s == "cpu") return d;
  if (s == "cuda") {
    d.kind = Device::Kind::kCuda;
    return d;
  }
  int index = 0;
  if (s.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(std::string(s.substr(5)), &index) &&
      index >= 0) {
    d.kind = Device::Kind::kCuda;
    d.index = index;
    return d;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device '", std::string(s), "': expected cpu, cuda or cuda:N"));
}

}  // namespace moemesh
