#include "mesh/tensor_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/dtype.h"

namespace moemesh {
namespace {

absl::Status ShapeError(const char* what, const wire::Tensor& t, const std::string& want) {
  std::string got;
  for (int i = 0; i < t.shape_size(); ++i) absl::StrAppend(&got, i ? ", " : "", t.shape(i));
  return absl::InvalidArgumentError(
      absl::StrCat("tensor '", what, "' has shape [", got, "], expected ", want));
}

size_t ElementSize(wire::DType d) {
  return d == wire::DTYPE_F32 || d == wire::DTYPE_I32 ? 4 : 2;
}

absl::Status CheckRank2(const wire::Tensor& t, const char* what, int64_t rows, int64_t cols) {
  if (t.shape_size() != 2 || t.shape(0) < 0 || t.shape(1) < 0 ||
      (rows >= 0 && t.shape(0) != rows) || (cols >= 0 && t.shape(1) != cols)) {
    return ShapeError(what, t, absl::StrCat("[", rows < 0 ? std::string("n") : absl::StrCat(rows),
                                            ", ", cols < 0 ? std::string("m") : absl::StrCat(cols),
                                            "]"));
  }
  const size_t want = static_cast<size_t>(t.shape(0)) * t.shape(1) * ElementSize(t.dtype());
  if (t.data().size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", what, "' has ", t.data().size(),
                                                   " bytes, its shape and dtype need ", want));
  }
  return absl::OkStatus();
}

}  // namespace

void EncodeFloats(const float* data, int64_t rows, int64_t cols, wire::DType dtype,
                  wire::Tensor* t) {
  t->set_dtype(dtype);
  t->clear_shape();
  t->add_shape(rows);
  t->add_shape(cols);
  const size_t n = static_cast<size_t>(rows) * cols;
  std::string* bytes = t->mutable_data();
  if (dtype == wire::DTYPE_BF16) {
    bytes->resize(n * 2);
    uint16_t* dst = reinterpret_cast<uint16_t*>(bytes->data());
    for (size_t i = 0; i < n; ++i) dst[i] = F32ToBF16(data[i]);
  } else {
    t->set_dtype(wire::DTYPE_F32);
    bytes->assign(reinterpret_cast<const char*>(data), n * sizeof(float));
  }
}

absl::Status DecodeFloats(const wire::Tensor& t, const char* what, int64_t* rows, int64_t* cols,
                          std::vector<float>* out) {
  if (t.dtype() == wire::DTYPE_I32) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", what, "' must be floating point"));
  }
  absl::Status st = CheckRank2(t, what, *rows, *cols);
  if (!st.ok()) return st;
  *rows = t.shape(0);
  *cols = t.shape(1);
  const size_t n = static_cast<size_t>(*rows) * *cols;
  out->resize(n);
  DType d = t.dtype() == wire::DTYPE_F32 ? DType::kF32
            : t.dtype() == wire::DTYPE_BF16 ? DType::kBF16 : DType::kF16;
  ToF32(t.data().data(), d, n, out->data());
  return absl::OkStatus();
}

absl::Status AccumulateFloats(const wire::Tensor& t, int64_t rows, int64_t cols, float* out) {
  absl::Status st = CheckRank2(t, "out", rows, cols);
  if (!st.ok()) return st;
  const size_t n = static_cast<size_t>(rows) * cols;
  if (t.dtype() == wire::DTYPE_F32) {
    const float* src = reinterpret_cast<const float*>(t.data().data());
    for (size_t i = 0; i < n; ++i) out[i] += src[i];
  } else if (t.dtype() == wire::DTYPE_BF16) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(t.data().data());
    for (size_t i = 0; i < n; ++i) out[i] += BF16ToF32(src[i]);
  } else {
    return absl::InvalidArgumentError("tensor 'out' must be F32 or BF16");
  }
  return absl::OkStatus();
}

void EncodeInts(const int32_t* data, int64_t rows, int64_t cols, wire::Tensor* t) {
  t->set_dtype(wire::DTYPE_I32);
  t->clear_shape();
  t->add_shape(rows);
  t->add_shape(cols);
  t->mutable_data()->assign(reinterpret_cast<const char*>(data),
                            static_cast<size_t>(rows) * cols * sizeof(int32_t));
}

absl::Status DecodeInts(const wire::Tensor& t, const char* what, int64_t rows, int64_t cols,
                        std::vector<int32_t>* out) {
  if (t.dtype() != wire::DTYPE_I32) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", what, "' must be I32"));
  }
  absl::Status st = CheckRank2(t, what, rows, cols);
  if (!st.ok()) return st;
  out->resize(static_cast<size_t>(rows) * cols);
  std::memcpy(out->data(), t.data().data(), out->size() * sizeof(int32_t));
  return absl::OkStatus();
}

}  // namespace moemesh
