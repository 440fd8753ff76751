// Tensors on the wire (moemesh.internal.v1.Tensor): raw little-endian bytes with dtype and shape.
#ifndef MOEMESH_MESH_TENSOR_CODEC_H_
#define MOEMESH_MESH_TENSOR_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "protos/worker.pb.h"

namespace moemesh {

namespace wire = ::moemesh::internal::v1;

// rows x cols fp32 values -> `t` as F32 or BF16 (rounded to nearest even).
void EncodeFloats(const float* data, int64_t rows, int64_t cols, wire::DType dtype, wire::Tensor* t);
// `t` (F32, BF16 or F16, rank 2) -> fp32, checking the shape is [rows, cols] where each expected
// value >= 0 (-1 = any; the actual values are returned).
absl::Status DecodeFloats(const wire::Tensor& t, const char* what, int64_t* rows, int64_t* cols,
                          std::vector<float>* out);
// Adds `t` (F32/BF16, [rows, cols]) into out[rows * cols].
absl::Status AccumulateFloats(const wire::Tensor& t, int64_t rows, int64_t cols, float* out);

void EncodeInts(const int32_t* data, int64_t rows, int64_t cols, wire::Tensor* t);
absl::Status DecodeInts(const wire::Tensor& t, const char* what, int64_t rows, int64_t cols,
                        std::vector<int32_t>* out);

}  // namespace moemesh

#endif  // MOEMESH_MESH_TENSOR_CODEC_H_
