#include "engine/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include "absl/strings/str_cat.h"
#include "engine/argmax.h"
#include "engine/expert_groups.h"
#include "engine/ops/attention.h"
#include "engine/ops/kernels.h"
#include "engine/ops/threading.h"

namespace moemesh {
namespace {

// RunExperts runs whole experts on separate threads when Linear would keep each expert's
// products on one thread (decode-sized calls: one expert's weights are too few to split, but
// the active experts together are not) and the experts' estimated time (Linear's model:
// weight streaming or multiply-adds, whichever is slower) gives each thread at least
// kExpertNsPerThread (a fork/join costs microseconds on a quiet machine).
constexpr double kExpertNsPerThread = 20000.0;
// Attention multiply-adds (keys x heads x head_dim) per thread before a batch's sequences are
// attended on separate threads (~50 us of one core at decode; ParallelRun's regions never
// wait for a worker that has not started, so a busy machine costs little).
constexpr int64_t kAttentionWorkPerThread = 1 << 18;

void AddInto(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace

// ---------------------------------------------------------------- Embedder

absl::StatusOr<std::unique_ptr<Embedder>> Embedder::Load(const CheckpointReader& ckpt,
                                                         const ModelConfig& cfg) {
  auto e = std::make_unique<Embedder>();
  auto t = ckpt.Get("model.embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size});
  if (!t.ok()) return t.status();
  e->table_ = *t;
  e->vocab_ = cfg.vocab_size;
  e->hidden_ = cfg.hidden_size;
  return e;
}

absl::Status Embedder::Embed(const int32_t* ids, int64_t n, float* out) const {
  const size_t row_bytes = hidden_ * DTypeSize(table_->dtype);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", ids[i], " outside the vocabulary [0, ", vocab_, ")"));
    }
    const uint8_t* row = static_cast<const uint8_t*>(table_->data) + ids[i] * row_bytes;
    ToF32(row, table_->dtype, hidden_, out + i * hidden_);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------- ExpertShard

namespace {
// A load that ran out of host memory (a std::bad_alloc from a container on the way): a clear
// RESOURCE_EXHAUSTED instead of std::terminate.
absl::Status OutOfMemoryLoading(const std::string& what, size_t experts) {
  return absl::ResourceExhaustedError(absl::StrCat(
      "out of memory loading ", what, experts > 0 ? absl::StrCat(" (", experts, " of them)") : "",
      ": fewer layers or experts per process (--num_layers, --shards), or "
      "--quantize_experts=int8|int4, need less"));
}
}  // namespace

absl::Status ExpertShard::SetShards(const ModelConfig& cfg, const std::set<ExpertId>& shards) {
  for (const ExpertId& id : shards) {
    if (id.first < 0 || id.first >= cfg.num_hidden_layers || id.second < 0 ||
        id.second >= cfg.num_experts || !cfg.IsMoeLayer(id.first)) {
      return absl::InvalidArgumentError(absl::StrCat("no expert ", id.second, " in layer ",
                                                     id.first, " of this model"));
    }
  }
  held_.assign(cfg.num_hidden_layers, std::vector<bool>(cfg.num_experts, false));
  shards_.clear();
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      ExpertId id(static_cast<int32_t>(l), static_cast<int32_t>(e));
      if (!shards.empty() && shards.count(id) == 0) continue;
      held_[l][e] = true;
      shards_.insert(id);
    }
  }
  return absl::OkStatus();
}

absl::Status ExpertShard::CheckRouting(int32_t layer, int64_t n, const int32_t* ids,
                                       int64_t k) const {
  if (layer < 0 || layer >= static_cast<int32_t>(held_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  for (int64_t i = 0; i < n * k; ++i) {
    const int32_t e = ids[i];
    if (e >= 0 && !Holds(layer, e)) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert ", e, " of layer ", layer, " is not held by this shard"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ExpertShard>> ExpertShard::Load(const CheckpointReader& ckpt,
                                                               const ModelConfig& cfg,
                                                               const ArchSpec& arch,
                                                               const std::set<ExpertId>& shards,
                                                               const LoadOptions& opt) {
  try {
    if (opt.device.is_cpu()) return CpuExpertShard::Load(ckpt, cfg, arch, shards, opt);
    auto backend = GetDeviceBackend(opt.device.kind);
    if (!backend.ok()) return backend.status();
    return (*backend)->load_experts(ckpt, cfg, arch, shards, opt);
  } catch (const std::bad_alloc&) {
    return OutOfMemoryLoading("experts", shards.size());
  }
}

absl::StatusOr<std::unique_ptr<CpuExpertShard>> CpuExpertShard::Load(
    const CheckpointReader& ckpt, const ModelConfig& cfg, const ArchSpec& arch,
    const std::set<ExpertId>& shards, const LoadOptions& opt) {
  auto s = std::make_unique<CpuExpertShard>();
  absl::Status st = s->SetShards(cfg, shards);
  if (!st.ok()) return st;
  s->hidden_ = cfg.hidden_size;
  s->width_ = cfg.moe_intermediate_size;
  s->num_experts_ = cfg.num_experts;
  s->experts_.resize(cfg.num_hidden_layers);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    s->experts_[l].resize(cfg.num_experts);
    if (!cfg.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      if (!s->Holds(static_cast<int32_t>(l), static_cast<int32_t>(e))) continue;
      const MlpTensors t = ExpertTensorsOf(cfg, arch, l, e);
      auto gate_up = LoadFusedLinear(
          ckpt, {{t.gate.name, s->width_, ""}, {t.up.name, s->width_, ""}}, s->hidden_,
          opt.expert_compute());
      if (!gate_up.ok()) return gate_up.status();
      auto down = LoadLinear(ckpt, t.down.name, s->hidden_, s->width_, opt.expert_compute());
      if (!down.ok()) return down.status();
      s->experts_[l][e] =
          std::make_unique<Expert>(Expert{std::move(*gate_up), std::move(*down)});
      ckpt.ReleaseDummyValues(ExpertPrefix(arch, l, e));  // packed: a dummy is not held twice
    }
  }
  return s;
}

absl::Status CpuExpertShard::RunExperts(int32_t layer, const float* x, int64_t n,
                                        const int32_t* ids, const float* weights, int64_t k,
                                        float* out) const {
  absl::Status st = CheckRouting(layer, n, ids, k);
  if (!st.ok()) return st;
  ExpertGroups groups;
  GroupByExpert(ids, n, k, num_experts_, &groups);
  const int32_t G = groups.groups();
  // What the active experts need.
  double est_ns = 0;
  bool products_split = false;  // does Linear split any product across threads by itself?
  for (int32_t g = 0; g < G; ++g) {
    const Expert& ex = *experts_[layer][groups.experts[g]];
    const int64_t m = groups.begin[g + 1] - groups.begin[g];
    est_ns += ex.gate_up.EstimatedNs(m) + ex.down.EstimatedNs(m);
    products_split = products_split || ex.gate_up.ThreadsFor(m) > 1 || ex.down.ThreadsFor(m) > 1;
  }
  if (G == 0) return absl::OkStatus();
  // Scratch of this thread (kept between calls and never shrunk: fresh memory on every call was
  // ~10% of a batched decode step in page faults and zero-filling).
  auto grow = [](std::vector<float>* v, size_t n) {
    if (v->size() < n) v->resize(n);
    return v->data();
  };
  // Group g's SwiGLU for its rows: y [m, hidden].
  auto run_expert = [&](int32_t g, float* y) {
    thread_local std::vector<float> xe_buf, gu_buf, act_buf;
    const int32_t b = groups.begin[g];
    const int64_t m = groups.begin[g + 1] - b;
    const Expert& ex = *experts_[layer][groups.experts[g]];
    float* xe = grow(&xe_buf, m * hidden_);
    float* gu = grow(&gu_buf, m * 2 * width_);
    float* act = grow(&act_buf, m * width_);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(xe + i * hidden_, x + groups.row(b + i, k) * hidden_, hidden_ * sizeof(float));
    }
    ex.gate_up.Forward(xe, m, gu);
    ops::SiluMulRows(gu, m, width_, act);
    ex.down.Forward(act, m, y);
  };
  // out[r] += w * y[r], expert by expert in expert order (the summation order of every path).
  auto accumulate = [&](int32_t g, const float* y) {
    for (int32_t i = groups.begin[g]; i < groups.begin[g + 1]; ++i) {
      float* o = out + groups.row(i, k) * hidden_;
      const float w = weights[groups.assignment[i]];
      const float* yi = y + (i - groups.begin[g]) * hidden_;
      for (int64_t c = 0; c < hidden_; ++c) o[c] += w * yi[c];
    }
  };

  // Decode-sized calls (a few rows per expert, or many rows of small experts) run whole
  // experts on separate threads, each product alone on its thread: one fork per layer, where
  // Linear would keep each product on the calling thread (it splits products only above
  // ~100 us of work), so single-stream decode of a big MoE would otherwise read the experts --
  // most of its bytes -- with one core (linear_benchmark --qwen3: ~40 GB/s of ~70), and a
  // batched decode step of a small MoE would run its expert multiply-adds on one core.
  const int threads =
      G > 1 && !products_split
          ? ops::ThreadsFor(static_cast<int64_t>(est_ns), ops::SyncThreads(),
                            static_cast<int64_t>(kExpertNsPerThread))
          : 1;
  thread_local std::vector<float> ys;
  if (threads > 1) {
    // y of every group, back to back in grouped-row order: [rows, hidden].
    float* ys_data = grow(&ys, static_cast<size_t>(groups.rows()) * hidden_);
    ops::ParallelForDynamic(threads, G, [&](int64_t g) {
      run_expert(static_cast<int32_t>(g), ys_data + groups.begin[g] * hidden_);
    });
    for (int32_t g = 0; g < G; ++g) accumulate(g, ys_data + groups.begin[g] * hidden_);
    return absl::OkStatus();
  }
  for (int32_t g = 0; g < G; ++g) {
    float* y = grow(&ys, static_cast<size_t>(groups.begin[g + 1] - groups.begin[g]) * hidden_);
    run_expert(g, y);
    accumulate(g, y);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------- AttentionStack

absl::StatusOr<std::unique_ptr<AttentionStack>> AttentionStack::Load(
    const CheckpointReader& ckpt, const ModelConfig& cfg, const ArchSpec& arch,
    const LoadOptions& opt) {
  try {
    if (opt.device.is_cpu()) return CpuAttentionStack::Load(ckpt, cfg, arch, opt);
    auto backend = GetDeviceBackend(opt.device.kind);
    if (!backend.ok()) return backend.status();
    return (*backend)->load_attention(ckpt, cfg, arch, opt);
  } catch (const std::bad_alloc&) {
    return OutOfMemoryLoading("the attention stack", 0);
  }
}

absl::Status AttentionStack::PlanBatch(const std::vector<SeqStep>& batch, const KvCache& cache,
                                       std::vector<int64_t>* offset, int64_t* tokens,
                                       int64_t* kmax, int64_t* out_rows) const {
  const int64_t E = cfg_.num_experts;
  int64_t T = 0;
  *kmax = 1;
  *out_rows = 0;
  offset->resize(batch.size());
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqStep& s = batch[b];
    if (s.tokens.empty()) return absl::InvalidArgumentError("a batch entry has no tokens");
    const int64_t k = s.experts_per_token > 0 ? s.experts_per_token : cfg_.num_experts_per_tok;
    if (k > E) {
      return absl::InvalidArgumentError(
          absl::StrCat("experts_per_token ", k, " exceeds the model's ", E, " experts"));
    }
    if (!cache.Has(s.seq_id)) {
      return absl::FailedPreconditionError(absl::StrCat("sequence ", s.seq_id, " has no KV cache"));
    }
    if (cache.Reserved(s.seq_id) < s.start_pos + static_cast<int64_t>(s.tokens.size())) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", s.seq_id, " has no KV cache room for its new tokens"));
    }
    *kmax = std::max(*kmax, k);
    (*offset)[b] = T;
    T += static_cast<int64_t>(s.tokens.size());
    *out_rows += s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
  }
  *tokens = T;
  return absl::OkStatus();
}

std::unique_ptr<KvCache> CpuAttentionStack::NewCache(int64_t capacity_tokens) const {
  return std::make_unique<KvCache>(cfg_.num_hidden_layers, kv_dim(), capacity_tokens,
                                   /*host_storage=*/true, cfg_.num_key_value_heads, kv_dtype_);
}

absl::StatusOr<std::unique_ptr<CpuAttentionStack>> CpuAttentionStack::Load(
    const CheckpointReader& ckpt, const ModelConfig& cfg, const ArchSpec& arch,
    const LoadOptions& opt) {
  auto s = std::make_unique<CpuAttentionStack>();
  s->cfg_ = cfg;
  s->arch_ = arch;
  s->kv_dtype_ = opt.kv_dtype;
  const ComputeType ct = opt.attention_compute();  // --quantize_attention, else `compute`
  const int64_t h = cfg.hidden_size, hd = cfg.head_dim;
  const int64_t qd = cfg.num_attention_heads * hd, kvd = cfg.num_key_value_heads * hd;
  s->layers_.resize(cfg.num_hidden_layers);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    Layer& L = s->layers_[l];
    const LayerTensors t = LayerTensorsOf(cfg, arch, l);
#define MOEMESH_ASSIGN(lhs, expr)     \
  {                                   \
    auto _v = (expr);                 \
    if (!_v.ok()) return _v.status(); \
    lhs = std::move(*_v);             \
  }
    MOEMESH_ASSIGN(L.input_norm, LoadVector(ckpt, t.input_norm.name, h));
    MOEMESH_ASSIGN(L.post_norm, LoadVector(ckpt, t.post_norm.name, h));
    MOEMESH_ASSIGN(L.qkv, LoadFusedLinear(ckpt,
                                          {{t.q.name, qd, t.q_bias.name},
                                           {t.k.name, kvd, t.k_bias.name},
                                           {t.v.name, kvd, t.v_bias.name}},
                                          h, ct));
    MOEMESH_ASSIGN(L.o, LoadFusedLinear(ckpt, {{t.o.name, h, t.o_bias.name}}, qd, ct));
    if (!t.q_norm.name.empty()) {  // [head_dim] per head, or the whole q (k) projection
      MOEMESH_ASSIGN(L.q_norm, LoadVector(ckpt, t.q_norm.name, t.q_norm.shape[0]));
      MOEMESH_ASSIGN(L.k_norm, LoadVector(ckpt, t.k_norm.name, t.k_norm.shape[0]));
    }
    L.moe = cfg.IsMoeLayer(l);
    if (L.moe) {
      // The router stays in fp32: routing decisions are sensitive and the matrix is small.
      MOEMESH_ASSIGN(L.router,
                     LoadLinear(ckpt, t.router.name, cfg.num_experts, h, ComputeType::kF32));
    }
    // The dense MLP of a dense layer, or the shared expert of a MoE layer.
    L.has_mlp = !t.mlp.gate.name.empty();
    if (L.has_mlp) {
      const int64_t w = t.mlp.gate.shape[0];
      MOEMESH_ASSIGN(L.mlp_gate_up,
                     LoadFusedLinear(ckpt, {{t.mlp.gate.name, w, ""}, {t.mlp.up.name, w, ""}}, h,
                                     ct));
      MOEMESH_ASSIGN(L.mlp_down, LoadLinear(ckpt, t.mlp.down.name, h, w, ct));
    }
    L.has_shared_gate = !t.shared_expert_gate.name.empty();
    if (L.has_shared_gate) {
      MOEMESH_ASSIGN(L.shared_gate,
                     LoadLinear(ckpt, t.shared_expert_gate.name, 1, h, ComputeType::kF32));
    }
    ckpt.ReleaseDummyValues(LayerWeightName(l, ""));  // packed or copied: not held twice
  }
  MOEMESH_ASSIGN(s->final_norm_, LoadVector(ckpt, "model.norm.weight", h));
  const std::string head = cfg.tie_word_embeddings || ckpt.Find("lm_head.weight") == nullptr
                               ? "model.embed_tokens.weight"
                               : "lm_head.weight";
  MOEMESH_ASSIGN(s->lm_head_, LoadLinear(ckpt, head, cfg.vocab_size, h, ct));
  if (head == "lm_head.weight") ckpt.ReleaseDummyValues(head);  // (the embedding stays)
#undef MOEMESH_ASSIGN
  return s;
}

absl::Status CpuAttentionStack::Forward(const std::vector<SeqStep>& batch, float* hidden,
                                        KvCache* cache, ExpertBackend* experts,
                                        std::vector<float>* logits) const {
  const int64_t H = cfg_.hidden_size, hd = cfg_.head_dim;
  const int64_t nh = cfg_.num_attention_heads, nkv = cfg_.num_key_value_heads;
  const int64_t qd = nh * hd, kvd = nkv * hd, qkvd = qd + 2 * kvd;
  const int64_t E = cfg_.num_experts;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const float theta = static_cast<float>(cfg_.rope_theta);

  int64_t T = 0, kmax = 1, out_rows = 0;
  std::vector<int64_t> offset;
  absl::Status planned = PlanBatch(batch, *cache, &offset, &T, &kmax, &out_rows);
  if (!planned.ok()) return planned;
  std::vector<int32_t> pos(T);
  int64_t attention_work = 0;  // keys visited, summed over the new tokens
  for (size_t b = 0; b < batch.size(); ++b) {
    const int64_t n = static_cast<int64_t>(batch[b].tokens.size());
    for (int64_t i = 0; i < n; ++i) {
      pos[offset[b] + i] = static_cast<int32_t>(batch[b].start_pos + i);
    }
    attention_work += n * batch[b].start_pos + n * (n + 1) / 2;
  }

  std::vector<float> xn(T * H), qkv(T * qkvd), q(T * qd), k(T * kvd), v(T * kvd), att(T * qd),
      tmp(T * H), moe_out(T * H), rl(T * E), route_w(T * kmax), mlp_gu, mlp_act;
  std::vector<int32_t> route_ids(T * kmax);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    // Attention block: x += o(attn(rope(qk_norm(qkv(norm(x))))))
    ops::RmsNorm(hidden, L.input_norm.data(), T, H, eps, xn.data());
    L.qkv.Forward(xn.data(), T, qkv.data());
    for (int64_t t = 0; t < T; ++t) {  // q: [T, nh, hd], k/v: [T, nkv, hd]
      const float* row = &qkv[t * qkvd];
      std::memcpy(&q[t * qd], row, qd * sizeof(float));
      std::memcpy(&k[t * kvd], row + qd, kvd * sizeof(float));
      std::memcpy(&v[t * kvd], row + qd + kvd, kvd * sizeof(float));
    }
    if (cfg_.clip_qkv.has_value()) {
      const float c = static_cast<float>(*cfg_.clip_qkv);
      for (auto* buf : {&q, &k, &v}) {
        for (float& x : *buf) x = std::min(std::max(x, -c), c);
      }
    }
    if (arch_.qk_norm == QkNorm::kPerHead) {
      ops::RmsNorm(q.data(), L.q_norm.data(), T * nh, hd, eps, q.data());
      ops::RmsNorm(k.data(), L.k_norm.data(), T * nkv, hd, eps, k.data());
    } else if (arch_.qk_norm == QkNorm::kFull) {
      ops::RmsNorm(q.data(), L.q_norm.data(), T, qd, eps, q.data());
      ops::RmsNorm(k.data(), L.k_norm.data(), T, kvd, eps, k.data());
    }
    ops::Rope(q.data(), pos.data(), T, nh, hd, theta);
    ops::Rope(k.data(), pos.data(), T, nkv, hd, theta);
    // KV writes and attention per sequence; the sequences of a batch on separate threads
    // (each one's attention then runs on its thread; one sequence splits its own heads).
    auto attend = [&](size_t b) {
      const SeqStep& s = batch[b];
      const int64_t n = static_cast<int64_t>(s.tokens.size());
      cache->Store(s.seq_id, l, s.start_pos, n, &k[offset[b] * kvd], &v[offset[b] * kvd]);
      if (cache->dtype() == KvDType::kInt8) {
        ops::Attention(&q[offset[b] * qd], cache->KInt8(s.seq_id, l), cache->VInt8(s.seq_id, l),
                       cache->KScale(s.seq_id, l), cache->VScale(s.seq_id, l), s.start_pos, n,
                       nh, nkv, hd, &att[offset[b] * qd],
                       /*row_stride=*/cache->head_dim(),
                       /*head_stride=*/cache->HeadStride(s.seq_id),
                       /*scale_row_stride=*/1, /*scale_head_stride=*/cache->Slots(s.seq_id));
      } else if (cache->dtype() == KvDType::kBF16) {
        ops::Attention(&q[offset[b] * qd], cache->KBf16(s.seq_id, l), cache->VBf16(s.seq_id, l),
                       s.start_pos, n, nh, nkv, hd, &att[offset[b] * qd],
                       /*row_stride=*/cache->head_dim(),
                       /*head_stride=*/cache->HeadStride(s.seq_id));
      } else {
        ops::Attention(&q[offset[b] * qd], cache->K(s.seq_id, l), cache->V(s.seq_id, l),
                       s.start_pos, n, nh, nkv, hd, &att[offset[b] * qd],
                       /*row_stride=*/cache->head_dim(),
                       /*head_stride=*/cache->HeadStride(s.seq_id));
      }
    };
    const int att_threads =
        batch.size() > 1
            ? ops::ThreadsFor(attention_work * nh * hd, ops::SyncThreads(), kAttentionWorkPerThread)
            : 1;
    ops::ParallelForDynamic(att_threads, static_cast<int64_t>(batch.size()),
                            [&](int64_t b) { attend(static_cast<size_t>(b)); });
    L.o.Forward(att.data(), T, tmp.data());
    AddInto(hidden, tmp.data(), T * H);

    // FFN block: x += moe(norm(x)) (+ shared expert) or dense mlp(norm(x)).
    ops::RmsNorm(hidden, L.post_norm.data(), T, H, eps, xn.data());
    std::fill(moe_out.begin(), moe_out.end(), 0.0f);
    if (L.moe) {
      L.router.Forward(xn.data(), T, rl.data());
      std::fill(route_ids.begin(), route_ids.end(), -1);
      std::fill(route_w.begin(), route_w.end(), 0.0f);
      std::vector<int32_t> ids_b;
      std::vector<float> w_b;
      for (size_t b = 0; b < batch.size(); ++b) {
        const SeqStep& s = batch[b];
        const int64_t n = static_cast<int64_t>(s.tokens.size());
        const int64_t kb = s.experts_per_token > 0 ? s.experts_per_token : cfg_.num_experts_per_tok;
        ids_b.resize(n * kb);
        w_b.resize(n * kb);
        ops::TopKRouting(&rl[offset[b] * E], n, E, kb, arch_.norm_topk_prob, ids_b.data(),
                         w_b.data());
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < kb; ++j) {
            route_ids[(offset[b] + i) * kmax + j] = ids_b[i * kb + j];
            route_w[(offset[b] + i) * kmax + j] = w_b[i * kb + j];
          }
        }
      }
      absl::Status st = experts->RunExperts(static_cast<int32_t>(l), xn.data(), T,
                                            route_ids.data(), route_w.data(), kmax,
                                            moe_out.data());
      if (!st.ok()) return st;
    }
    if (L.has_mlp) {
      const int64_t w = L.mlp_down.in();
      mlp_gu.resize(T * 2 * w);
      mlp_act.resize(T * w);
      L.mlp_gate_up.Forward(xn.data(), T, mlp_gu.data());
      ops::SiluMulRows(mlp_gu.data(), T, w, mlp_act.data());
      L.mlp_down.Forward(mlp_act.data(), T, tmp.data());
      if (L.has_shared_gate) {
        std::vector<float> g(T);
        L.shared_gate.Forward(xn.data(), T, g.data());
        for (int64_t t = 0; t < T; ++t) {
          const float s = 1.0f / (1.0f + std::exp(-g[t]));
          for (int64_t c = 0; c < H; ++c) tmp[t * H + c] *= s;
        }
      }
      AddInto(moe_out.data(), tmp.data(), T * H);
    }
    AddInto(hidden, moe_out.data(), T * H);
  }

  // Final norm and LM head over the requested rows.
  std::vector<float> sel(out_rows * H);
  int64_t r = 0;
  for (size_t b = 0; b < batch.size(); ++b) {
    const int64_t n = static_cast<int64_t>(batch[b].tokens.size());
    const int64_t first = batch[b].all_logits ? 0 : n - 1;
    for (int64_t i = first; i < n; ++i, ++r) {
      std::memcpy(&sel[r * H], hidden + (offset[b] + i) * H, H * sizeof(float));
    }
  }
  ops::RmsNorm(sel.data(), final_norm_.data(), out_rows, H, eps, sel.data());
  logits->resize(out_rows * cfg_.vocab_size);
  lm_head_.Forward(sel.data(), out_rows, logits->data());
  return absl::OkStatus();
}

// ---------------------------------------------------------------- Model

absl::StatusOr<LoadOptions::LoadFormat> ParseLoadFormat(std::string_view s) {
  if (s == "auto") return LoadOptions::LoadFormat::kAuto;
  if (s == "dummy") return LoadOptions::LoadFormat::kDummy;
  return absl::InvalidArgumentError(
      absl::StrCat("--load_format must be auto or dummy, not '", std::string(s), "'"));
}

absl::StatusOr<LoadOptions::WeightQuant> ParseWeightQuant(std::string_view s,
                                                          std::string_view flag) {
  if (s == "none") return LoadOptions::WeightQuant::kNone;
  if (s == "int8") return LoadOptions::WeightQuant::kInt8;
  if (s == "int4") return LoadOptions::WeightQuant::kInt4;
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(flag), " must be none, int8 or int4, not '", std::string(s), "'"));
}

absl::Status ApplyNumLayers(const LoadOptions& opt, ModelConfig* cfg) {
  if (opt.num_layers == 0) return absl::OkStatus();
  if (opt.num_layers < 0 || opt.num_layers > cfg->num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--num_layers must be in [1, ", cfg->num_hidden_layers, "] (", cfg->path, " has ",
        cfg->num_hidden_layers, " layers) or 0 for all, not ", opt.num_layers));
  }
  cfg->num_hidden_layers = opt.num_layers;
  cfg->mlp_only_layers.erase(
      std::remove_if(cfg->mlp_only_layers.begin(), cfg->mlp_only_layers.end(),
                     [&](int64_t l) { return l >= opt.num_layers; }),
      cfg->mlp_only_layers.end());
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir, const LoadOptions& opt) {
  auto cfg = ModelConfig::FromFile(dir + "/config.json");
  if (!cfg.ok()) return cfg.status();
  absl::Status st = ApplyNumLayers(opt, &*cfg);
  if (!st.ok()) return st;
  return cfg;
}

absl::StatusOr<std::unique_ptr<CheckpointReader>> OpenCheckpoint(
    const std::string& dir, const ModelConfig& cfg, const ArchSpec& arch, const LoadOptions& opt,
    std::function<bool(std::string_view name)> want) {
  if (opt.load_format == LoadOptions::LoadFormat::kDummy) {
    return CheckpointReader::OpenDummy(cfg, arch, cfg.dtype, /*seed=*/0, std::move(want));
  }
  return CheckpointReader::Open(dir, std::move(want));
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const LoadOptions& opt) {
  auto m = std::make_unique<Model>();
  auto cfg = LoadModelConfig(dir, opt);
  if (!cfg.ok()) return cfg.status();
  m->cfg_ = *cfg;
  auto arch = ArchFor(m->cfg_);
  if (!arch.ok()) return absl::InvalidArgumentError(absl::StrCat(dir, ": ", arch.status().message()));
  m->arch_ = *arch;
  auto ckpt = OpenCheckpoint(dir, m->cfg_, m->arch_, opt);
  if (!ckpt.ok()) return ckpt.status();
  m->ckpt_ = std::move(*ckpt);
  auto emb = Embedder::Load(*m->ckpt_, m->cfg_);
  if (!emb.ok()) return emb.status();
  m->embedder_ = std::move(*emb);
  auto att = AttentionStack::Load(*m->ckpt_, m->cfg_, m->arch_, opt);
  if (!att.ok()) return att.status();
  m->attention_ = std::move(*att);
  auto ex = ExpertShard::Load(*m->ckpt_, m->cfg_, m->arch_, {}, opt);
  if (!ex.ok()) return ex.status();
  m->experts_ = std::move(*ex);
  m->backend_ = std::make_unique<LocalExperts>(m->experts_.get());
  return m;
}

std::unique_ptr<KvCache> Model::NewCache(int64_t capacity_tokens) const {
  return attention_->NewCache(capacity_tokens);
}

// ---------------------------------------------------------------- device backends

namespace {
std::mutex& BackendMu() {
  static std::mutex mu;
  return mu;
}
std::map<Device::Kind, DeviceBackend>& Backends() {
  static auto* m = new std::map<Device::Kind, DeviceBackend>();
  return *m;
}
}  // namespace

void RegisterDeviceBackend(Device::Kind kind, DeviceBackend backend) {
  std::lock_guard<std::mutex> lock(BackendMu());
  Backends()[kind] = std::move(backend);
}

absl::StatusOr<const DeviceBackend*> GetDeviceBackend(Device::Kind kind) {
  std::lock_guard<std::mutex> lock(BackendMu());
  auto it = Backends().find(kind);
  if (it == Backends().end()) {
    return absl::FailedPreconditionError(
        "this binary was built without CUDA support: build it with `bazel build --config=cuda`");
  }
  return &it->second;
}

absl::StatusOr<std::string> DescribeDevice(const Device& d) {
  if (d.is_cpu()) return std::string("cpu");
  auto backend = GetDeviceBackend(d.kind);
  if (!backend.ok()) return backend.status();
  return (*backend)->describe(d);
}

absl::Status AttentionStack::ForwardArgMax(const std::vector<SeqStep>& batch, float* hidden,
                                           KvCache* cache, ExpertBackend* experts,
                                           std::vector<int32_t>* ids) const {
  thread_local std::vector<float> logits;  // kept: rows of a big vocabulary page-fault in
  absl::Status st = Forward(batch, hidden, cache, experts, &logits);
  if (!st.ok()) return st;
  const int64_t V = cfg_.vocab_size, rows = static_cast<int64_t>(logits.size()) / V;
  ids->resize(rows);
  for (int64_t r = 0; r < rows; ++r) (*ids)[r] = ArgMax(&logits[r * V], V);
  return absl::OkStatus();
}

absl::Status Model::Step(const std::vector<SeqStep>& batch, KvCache* cache,
                         std::vector<float>* logits) const {
  return Run(batch, cache, logits, nullptr);
}

absl::Status Model::StepArgMax(const std::vector<SeqStep>& batch, KvCache* cache,
                               std::vector<int32_t>* ids) const {
  return Run(batch, cache, nullptr, ids);
}

absl::Status Model::Run(const std::vector<SeqStep>& batch, KvCache* cache,
                        std::vector<float>* logits, std::vector<int32_t>* ids) const {
  int64_t T = 0;
  for (const SeqStep& s : batch) T += static_cast<int64_t>(s.tokens.size());
  // Every row is embedded below: not zero-filled first (a prefill's rows are megabytes).
  std::unique_ptr<float[]> hidden(new float[T * cfg_.hidden_size]);
  int64_t off = 0;
  for (const SeqStep& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (s.start_pos + n > cfg_.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence length ", s.start_pos + n,
                                                     " exceeds the context of ",
                                                     cfg_.max_position_embeddings));
    }
    absl::Status st = embedder_->Embed(s.tokens.data(), n, hidden.get() + off * cfg_.hidden_size);
    if (!st.ok()) return st;
    st = cache->Reserve(s.seq_id, s.start_pos + n);
    if (!st.ok()) return st;
    off += n;
  }
  if (ids != nullptr) return attention_->ForwardArgMax(batch, hidden.get(), cache, backend_.get(), ids);
  return attention_->Forward(batch, hidden.get(), cache, backend_.get(), logits);
}

}  // namespace moemesh
