#include "mesh/mpi_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace moemesh {
namespace mpi_wire {
namespace {

constexpr uint32_t kMagic = 0x3158454d;  // "MEX1"

static_assert(sizeof(MessageHeader) == 32, "MessageHeader layout");
static_assert(sizeof(TensorHeader) == 56, "TensorHeader layout");

absl::Status Describe(const wire::Tensor* t, bool present, const char* what, TensorHeader* h) {
  std::memset(h, 0, sizeof(*h));
  if (!present) return absl::OkStatus();
  if (t->shape_size() > kMaxRank) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", what, "' has ", t->shape_size(),
                                                    " dimensions; the MPI transport carries at most ",
                                                    kMaxRank));
  }
  h->present = 1;
  h->dtype = t->dtype();
  h->rank = t->shape_size();
  for (int i = 0; i < h->rank; ++i) h->shape[i] = t->shape(i);
  h->bytes = static_cast<int64_t>(t->data().size());
  return absl::OkStatus();
}

// Writes header, descriptors, message and tensor bytes into `buf`.
void Assemble(Kind kind, uint64_t id, int32_t layer, int32_t code, const std::string& message,
              const TensorHeader* th, const wire::Tensor* const* tensors, int n, std::string* buf) {
  MessageHeader h{};
  h.magic = kMagic;
  h.kind = static_cast<uint32_t>(kind);
  h.id = id;
  h.layer = layer;
  h.status_code = code;
  h.num_tensors = static_cast<uint32_t>(n);
  h.message_bytes = static_cast<uint32_t>(message.size());
  size_t total = sizeof(h) + n * sizeof(TensorHeader) + message.size();
  for (int i = 0; i < n; ++i) total += static_cast<size_t>(th[i].bytes);
  buf->resize(total);
  char* p = &(*buf)[0];
  std::memcpy(p, &h, sizeof(h));
  p += sizeof(h);
  std::memcpy(p, th, n * sizeof(TensorHeader));
  p += n * sizeof(TensorHeader);
  std::memcpy(p, message.data(), message.size());
  p += message.size();
  for (int i = 0; i < n; ++i) {
    if (!th[i].present) continue;
    std::memcpy(p, tensors[i]->data().data(), th[i].bytes);
    p += th[i].bytes;
  }
}

// Reads what Assemble wrote; `tensors[i]` is cleared and filled when present.
absl::Status Parse(const char* data, size_t size, MessageHeader* h, std::string* message,
                   wire::Tensor** tensors, bool* present, int n) {
  if (size < sizeof(MessageHeader)) return absl::DataLossError("MPI message shorter than its header");
  std::memcpy(h, data, sizeof(*h));
  if (h->magic != kMagic) return absl::DataLossError("MPI message with a bad magic number");
  if (h->num_tensors != static_cast<uint32_t>(n)) {
    return absl::DataLossError(absl::StrCat("MPI message with ", h->num_tensors, " tensors, expected ", n));
  }
  size_t off = sizeof(MessageHeader);
  if (size - off < n * sizeof(TensorHeader) + h->message_bytes) {
    return absl::DataLossError("MPI message truncated (descriptors)");
  }
  TensorHeader th[kMaxRank];  // n <= 3
  std::memcpy(th, data + off, n * sizeof(TensorHeader));
  off += n * sizeof(TensorHeader);
  if (message != nullptr) message->assign(data + off, h->message_bytes);
  off += h->message_bytes;
  for (int i = 0; i < n; ++i) {
    present[i] = th[i].present != 0;
    if (!present[i]) continue;
    if (th[i].rank < 0 || th[i].rank > kMaxRank || th[i].bytes < 0 ||
        static_cast<size_t>(th[i].bytes) > size - off) {
      return absl::DataLossError("MPI message truncated or with a bad tensor descriptor");
    }
    wire::Tensor* t = tensors[i];
    t->Clear();
    t->set_dtype(static_cast<wire::DType>(th[i].dtype));
    for (int d = 0; d < th[i].rank; ++d) t->add_shape(th[i].shape[d]);
    t->mutable_data()->assign(data + off, th[i].bytes);
    off += th[i].bytes;
  }
  if (off != size) return absl::DataLossError("MPI message longer than its contents");
  return absl::OkStatus();
}

}  // namespace

absl::Status EncodeRequest(uint64_t id, const wire::RunExpertsRequest& req, std::string* buf) {
  const wire::Tensor* ts[3] = {&req.x(), &req.ids(), &req.weights()};
  const bool present[3] = {req.has_x(), req.has_ids(), req.has_weights()};
  const char* names[3] = {"x", "ids", "weights"};
  TensorHeader th[3];
  for (int i = 0; i < 3; ++i) {
    absl::Status st = Describe(ts[i], present[i], names[i], &th[i]);
    if (!st.ok()) return st;
  }
  Assemble(Kind::kRequest, id, req.layer(), 0, std::string(), th, ts, 3, buf);
  return absl::OkStatus();
}

void EncodeStop(std::string* buf) {
  Assemble(Kind::kStop, 0, 0, 0, std::string(), nullptr, nullptr, 0, buf);
}

void EncodeResponse(uint64_t id, const absl::Status& status, const wire::RunExpertsResponse& resp,
                    std::string* buf) {
  const wire::Tensor* ts[1] = {&resp.out()};
  TensorHeader th[1];
  if (!status.ok()) {
    std::memset(th, 0, sizeof(th));
    std::string msg(status.message().substr(0, kMaxErrorMessageBytes));
    Assemble(Kind::kResponse, id, 0, static_cast<int32_t>(status.code()), msg, th, ts, 1, buf);
    return;
  }
  absl::Status st = Describe(ts[0], resp.has_out(), "out", th);
  if (!st.ok()) {
    std::string msg(st.message());
    std::memset(th, 0, sizeof(th));
    Assemble(Kind::kResponse, id, 0, static_cast<int32_t>(st.code()), msg, th, ts, 1, buf);
    return;
  }
  Assemble(Kind::kResponse, id, 0, 0, std::string(), th, ts, 1, buf);
}

absl::Status PeekKind(const char* data, size_t size, Kind* kind, uint64_t* id) {
  if (size < sizeof(MessageHeader)) return absl::DataLossError("MPI message shorter than its header");
  MessageHeader h;
  std::memcpy(&h, data, sizeof(h));
  if (h.magic != kMagic) return absl::DataLossError("MPI message with a bad magic number");
  if (h.kind < 1 || h.kind > 3) return absl::DataLossError(absl::StrCat("MPI message of unknown kind ", h.kind));
  *kind = static_cast<Kind>(h.kind);
  *id = h.id;
  return absl::OkStatus();
}

absl::Status DecodeRequest(const char* data, size_t size, uint64_t* id,
                           wire::RunExpertsRequest* req) {
  req->Clear();
  MessageHeader h;
  wire::Tensor x, ids, w;
  wire::Tensor* ts[3] = {&x, &ids, &w};
  bool present[3];
  absl::Status st = Parse(data, size, &h, nullptr, ts, present, 3);
  if (!st.ok()) return st;
  if (h.kind != static_cast<uint32_t>(Kind::kRequest)) return absl::DataLossError("not a request");
  *id = h.id;
  req->set_layer(h.layer);
  if (present[0]) req->mutable_x()->Swap(&x);
  if (present[1]) req->mutable_ids()->Swap(&ids);
  if (present[2]) req->mutable_weights()->Swap(&w);
  return absl::OkStatus();
}

absl::Status DecodeResponse(const char* data, size_t size, uint64_t* id, absl::Status* status,
                            wire::RunExpertsResponse* resp) {
  resp->Clear();
  MessageHeader h;
  std::string message;
  wire::Tensor* ts[1] = {resp->mutable_out()};
  bool present[1];
  absl::Status st = Parse(data, size, &h, &message, ts, present, 1);
  if (!st.ok()) return st;
  if (h.kind != static_cast<uint32_t>(Kind::kResponse)) return absl::DataLossError("not a response");
  if (!present[0]) resp->clear_out();
  *id = h.id;
  *status = h.status_code == 0
                ? absl::OkStatus()
                : absl::Status(static_cast<absl::StatusCode>(h.status_code), message);
  return absl::OkStatus();
}

size_t MaxResponseBytes(const wire::RunExpertsRequest& req) {
  const size_t fixed = sizeof(MessageHeader) + sizeof(TensorHeader);
  size_t out = 0;
  const wire::Tensor& x = req.x();
  // Only a well-formed x gets an out (else the expert answers with an error): its element count
  // is then its byte count over its element size, which also bounds absurd shapes.
  if (x.shape_size() == 2 && x.shape(0) >= 0 && x.shape(1) >= 0 && x.dtype() != wire::DTYPE_I32) {
    const size_t in_elem = x.dtype() == wire::DTYPE_F32 ? 4 : 2;
    const size_t elems = x.data().size() / in_elem;
    if (x.shape(1) == 0 || static_cast<size_t>(x.shape(0)) == elems / x.shape(1)) {
      out = elems * (x.dtype() == wire::DTYPE_BF16 ? 2 : 4);
    }
  }
  return fixed + std::max(out, kMaxErrorMessageBytes);
}

}  // namespace mpi_wire
}  // namespace moemesh
