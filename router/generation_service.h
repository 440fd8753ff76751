// gRPC adapter of the public API (moemesh.v1.Generation) over a Router.
#ifndef MOEMESH_ROUTER_GENERATION_SERVICE_H_
#define MOEMESH_ROUTER_GENERATION_SERVICE_H_

#include "engine/tokenizer.h"
#include "protos/generation.grpc.pb.h"
#include "router/router.h"

namespace moemesh {

class GenerationService final : public moemesh::v1::Generation::CallbackService {
 public:
  // `router` and `tok` must outlive the service. `info`: what GetModelInfo answers.
  GenerationService(Router* router, const Tokenizer* tok, moemesh::v1::ModelInfo info)
      : router_(router), tok_(tok), info_(std::move(info)) {}

  grpc::ServerWriteReactor<moemesh::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const moemesh::v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const moemesh::v1::TokenizeRequest* req,
                                     moemesh::v1::TokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const moemesh::v1::DetokenizeRequest* req,
                                       moemesh::v1::DetokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const moemesh::v1::GetModelInfoRequest* req,
                                         moemesh::v1::ModelInfo* resp) override;

 private:
  Router* router_;
  const Tokenizer* tok_;
  const moemesh::v1::ModelInfo info_;
};

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_GENERATION_SERVICE_H_
