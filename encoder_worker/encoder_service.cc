#include "encoder_worker/encoder_service.h"

#include <vector>

#include "mesh/grpc_clients.h"
#include "mesh/tensor_codec.h"

namespace moemesh {

grpc::ServerUnaryReactor* EncoderService::Encode(grpc::CallbackServerContext* ctx,
                                                 const internal::v1::EncodeRequest* req,
                                                 internal::v1::EncodeResponse* resp) {
  const int64_t n = req->ids_size(), h = embedder_->hidden();
  std::vector<float> out(n * h);
  absl::Status st = embedder_->Embed(req->ids().data(), n, out.data());
  if (st.ok()) {
    EncodeFloats(out.data(), n, h,
                 req->dtype() == internal::v1::DTYPE_BF16 ? internal::v1::DTYPE_BF16
                                                          : internal::v1::DTYPE_F32,
                 resp->mutable_hidden());
  }
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(st));
  return reactor;
}

}  // namespace moemesh
