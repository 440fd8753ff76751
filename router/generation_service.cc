#include "router/generation_service.h"

#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "mesh/grpc_clients.h"

namespace moemesh {
namespace {

using moemesh::v1::GenerateResponse;

// One streaming Generate call. Owned by gRPC until OnDone; the router never calls it after
// OnFinish, and OnDone comes only after Finish, which comes only after OnFinish (or a rejected
// Submit), so `delete this` in OnDone is safe.
class GenerateReactor final : public grpc::ServerWriteReactor<GenerateResponse>,
                              public GenerationSink {
 public:
  GenerateReactor(Router* router, const moemesh::v1::GenerateRequest& req) : router_(router) {
    std::lock_guard<std::mutex> l(mu_);
    auto id = router_->Submit(req, this);
    if (!id.ok()) {
      Finish(ToGrpc(id.status()));
      finished_ = true;
      return;
    }
    id_ = *id;
    submitted_ = true;
  }

  void OnResponse(const GenerateResponse& r) override {
    std::lock_guard<std::mutex> l(mu_);
    pending_.push_back(r);
    if (!writing_) {
      writing_ = true;
      StartWrite(&pending_.front());
    }
  }

  void OnFinish(const absl::Status& st) override {
    std::lock_guard<std::mutex> l(mu_);
    router_done_ = true;
    final_ = ToGrpc(st);
    if (!writing_ && !finished_) {
      finished_ = true;
      Finish(final_);
    }
  }

  void OnWriteDone(bool ok) override {
    bool cancel = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      pending_.pop_front();
      if (!ok) {
        // The client went away: drop what is queued and stop the sequence.
        pending_.clear();
        cancel = !router_done_;
      }
      if (!pending_.empty()) {
        StartWrite(&pending_.front());
      } else {
        writing_ = false;
        if (router_done_ && !finished_) {
          finished_ = true;
          Finish(final_);
        }
      }
    }
    if (cancel) router_->Cancel(id_);
  }

  void OnCancel() override {
    if (submitted_) router_->Cancel(id_);
  }

  void OnDone() override { delete this; }

 private:
  Router* const router_;
  uint64_t id_ = 0;
  bool submitted_ = false;
  std::mutex mu_;
  std::deque<GenerateResponse> pending_;
  bool writing_ = false, router_done_ = false, finished_ = false;
  grpc::Status final_;
};

}  // namespace

grpc::ServerWriteReactor<GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext*, const moemesh::v1::GenerateRequest* req) {
  return new GenerateReactor(router_, *req);
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* ctx,
                                                      const moemesh::v1::TokenizeRequest* req,
                                                      moemesh::v1::TokenizeResponse* resp) {
  for (int32_t id : tok_->Encode(req->text(), req->add_special_tokens())) resp->add_ids(id);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Detokenize(grpc::CallbackServerContext* ctx,
                                                        const moemesh::v1::DetokenizeRequest* req,
                                                        moemesh::v1::DetokenizeResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  if (absl::Status st = CheckTokenIds("ids", req->ids(), tok_->vocab_size()); !st.ok()) {
    reactor->Finish(ToGrpc(st));
    return reactor;
  }
  resp->set_text(tok_->Decode(std::vector<int32_t>(req->ids().begin(), req->ids().end()),
                              req->skip_special_tokens()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                          const moemesh::v1::GetModelInfoRequest*,
                                                          moemesh::v1::ModelInfo* resp) {
  *resp = info_;
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moemesh
