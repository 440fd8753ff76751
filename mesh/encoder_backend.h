// How the attention worker gets the first hidden states of its tokens: from the Embedder in the
// same process, or from an encoder worker over gRPC.
#ifndef MOEMESH_MESH_ENCODER_BACKEND_H_
#define MOEMESH_MESH_ENCODER_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "engine/model.h"

namespace moemesh {

class EncoderBackend {
 public:
  virtual ~EncoderBackend() = default;
  // out: [n, hidden]. Thread-safe.
  virtual absl::Status Encode(const int32_t* ids, int64_t n, float* out) = 0;
  // Why Encode would fail now ("" when nothing is known to stop it). Thread-safe.
  virtual std::string Unavailable() { return ""; }
};

class LocalEncoder : public EncoderBackend {
 public:
  explicit LocalEncoder(const Embedder* e) : e_(e) {}
  absl::Status Encode(const int32_t* ids, int64_t n, float* out) override {
    return e_->Embed(ids, n, out);
  }

 private:
  const Embedder* e_;
};

}  // namespace moemesh

#endif  // MOEMESH_MESH_ENCODER_BACKEND_H_
