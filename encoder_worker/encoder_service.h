// gRPC adapter of an encoder worker: token ids -> first hidden states, through Embedder.
#ifndef MOEMESH_ENCODER_WORKER_ENCODER_SERVICE_H_
#define MOEMESH_ENCODER_WORKER_ENCODER_SERVICE_H_

#include "engine/model.h"
#include "protos/worker.grpc.pb.h"

namespace moemesh {

class EncoderService final : public internal::v1::Encoder::CallbackService {
 public:
  explicit EncoderService(const Embedder* embedder) : embedder_(embedder) {}
  grpc::ServerUnaryReactor* Encode(grpc::CallbackServerContext* ctx,
                                   const internal::v1::EncodeRequest* req,
                                   internal::v1::EncodeResponse* resp) override;

 private:
  const Embedder* embedder_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENCODER_WORKER_ENCODER_SERVICE_H_
