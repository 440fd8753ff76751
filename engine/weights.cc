#include "engine/weights.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace moemesh {

absl::StatusOr<std::vector<float>> LoadVector(const CheckpointReader& ckpt, const std::string& name,
                                              int64_t n) {
  auto t = ckpt.Get(name, {n});
  if (!t.ok()) return t.status();
  std::vector<float> v(n);
  ToF32((*t)->data, (*t)->dtype, n, v.data());
  return v;
}

absl::StatusOr<ops::Linear> LoadLinear(const CheckpointReader& ckpt, const std::string& name,
                                       int64_t out, int64_t in, ComputeType ct,
                                       const std::string& bias) {
  auto t = ckpt.Get(name, {out, in});
  if (!t.ok()) return t.status();
  std::vector<float> b;
  if (!bias.empty()) {
    auto bv = LoadVector(ckpt, bias, out);
    if (!bv.ok()) return bv.status();
    b = std::move(*bv);
  }
  return ops::Linear::Create((*t)->data, (*t)->dtype, out, in, ct, b.empty() ? nullptr : b.data());
}

absl::StatusOr<ops::Linear> LoadFusedLinear(const CheckpointReader& ckpt,
                                            const std::vector<LinearPart>& parts, int64_t in,
                                            ComputeType ct) {
  if (parts.size() == 1 && parts[0].bias.empty()) {
    return LoadLinear(ckpt, parts[0].weight, parts[0].rows, in, ct);
  }
  int64_t total = 0;
  std::vector<const TensorInfo*> infos;
  for (const LinearPart& p : parts) {
    auto t = ckpt.Get(p.weight, {p.rows, in});
    if (!t.ok()) return t.status();
    if (!infos.empty() && (*t)->dtype != infos[0]->dtype) {
      return absl::InvalidArgumentError(absl::StrCat((*t)->file, ": tensor '", p.weight,
                                                     "' has dtype ", std::string(DTypeName((*t)->dtype)),
                                                     ", expected ", std::string(DTypeName(infos[0]->dtype))));
    }
    infos.push_back(*t);
    total += p.rows;
  }
  const DType dt = infos[0]->dtype;
  std::vector<uint8_t> stacked(total * in * DTypeSize(dt));
  uint8_t* buf = stacked.data();
  std::vector<float> bias;
  bool any_bias = false;
  for (const LinearPart& p : parts) any_bias |= !p.bias.empty();
  size_t offset = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    std::memcpy(buf + offset, infos[i]->data, infos[i]->nbytes);
    offset += infos[i]->nbytes;
    if (any_bias) {
      if (parts[i].bias.empty()) {
        bias.insert(bias.end(), parts[i].rows, 0.0f);
      } else {
        auto b = LoadVector(ckpt, parts[i].bias, parts[i].rows);
        if (!b.ok()) return b.status();
        bias.insert(bias.end(), b->begin(), b->end());
      }
    }
  }
  return ops::Linear::Create(buf, dt, total, in, ct, any_bias ? bias.data() : nullptr);
}

}  // namespace moemesh
