// Byte layout of the attention-to-expert messages of the MPI transport (mesh/mpi_transport.h):
// a small fixed header, one descriptor per tensor, an error message (responses only), then the
// tensors' raw bytes exactly as the protobuf messages hold them. No MPI here, so it is unit
// tested without mpirun. Both ends must share the byte order (mpirun on one kind of host).
//
//   MessageHeader   magic, kind, request id, layer, status code, tensor count, message length
//   TensorHeader*   per tensor: present?, dtype, rank, shape (<= 4 dims), byte count
//   message bytes   status message (error responses; at most kMaxErrorMessageBytes)
//   tensor bytes    each tensor's data, in order
//
// Requests carry x, ids, weights (wire::RunExpertsRequest); responses carry out, or a status.
// A tensor decodes back to the same dtype, shape and bytes, so the expert side validates a
// request exactly as the gRPC service does and returns the same errors.
#ifndef MOEMESH_MESH_MPI_CODEC_H_
#define MOEMESH_MESH_MPI_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "mesh/tensor_codec.h"

namespace moemesh {
namespace mpi_wire {

enum class Kind : uint32_t {
  kRequest = 1,   // attention -> expert: RunExperts
  kResponse = 2,  // expert -> attention: out, or an error status
  kStop = 3,      // attention -> expert: stop serving; expert -> attention: no longer serving
};

constexpr int kMaxRank = 4;
constexpr size_t kMaxErrorMessageBytes = 2048;  // longer status messages are cut

struct MessageHeader {
  uint32_t magic;
  uint32_t kind;
  uint64_t id;           // request id, echoed by the response
  int32_t layer;         // requests
  int32_t status_code;   // responses: absl::StatusCode
  uint32_t num_tensors;
  uint32_t message_bytes;
};

struct TensorHeader {
  int32_t present;  // 0 = field not set in the protobuf message
  int32_t dtype;    // wire::DType
  int32_t rank;
  int32_t reserved;
  int64_t shape[kMaxRank];
  int64_t bytes;
};

// Request -> `buf` (replaced). InvalidArgument if a tensor has more than kMaxRank dimensions.
absl::Status EncodeRequest(uint64_t id, const wire::RunExpertsRequest& req, std::string* buf);
// A stop message (no payload).
void EncodeStop(std::string* buf);
// Response (status ok: `resp.out`; otherwise the code and message) -> `buf` (replaced).
void EncodeResponse(uint64_t id, const absl::Status& status, const wire::RunExpertsResponse& resp,
                    std::string* buf);

// The kind of a message and its id (DataLoss if it is not a message of this protocol).
absl::Status PeekKind(const char* data, size_t size, Kind* kind, uint64_t* id);
absl::Status DecodeRequest(const char* data, size_t size, uint64_t* id,
                           wire::RunExpertsRequest* req);
// `status` receives the expert's status; the return value is DataLoss for a malformed message.
absl::Status DecodeResponse(const char* data, size_t size, uint64_t* id, absl::Status* status,
                            wire::RunExpertsResponse* resp);

// The largest response a request can get (its out, or an error): what the attention side posts
// as the receive buffer. Both sides compute it from the request alone.
size_t MaxResponseBytes(const wire::RunExpertsRequest& req);

}  // namespace mpi_wire
}  // namespace moemesh

#endif  // MOEMESH_MESH_MPI_CODEC_H_
