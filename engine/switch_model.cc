#include "engine/switch_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/dtype.h"
#include "engine/json_fields.h"
#include "engine/safetensors.h"

namespace moemesh {
namespace {

// A token id field: an integer, or a list whose first entry is used (as generate() does);
// `def` when absent or empty.
int32_t FirstTokenId(Fields& f, const char* key, int32_t def) {
  const std::vector<int32_t> ids = f.TokenIds(key);
  return ids.empty() ? def : ids[0];
}

// A required integer field that must be positive.
int64_t PositiveInt(Fields& f, const char* key) {
  const int64_t v = f.Int(key);
  f.CheckAtLeast(key, v, 1);
  return v;
}

bool BlockSparse(int64_t step, int64_t i) {
  // transformers' SwitchTransformersStack: (i % sparse_step == 1 or sparse_step == 1).
  return step > 0 && (i % step == 1 || step == 1);
}

// transformers' _relative_position_bucket for relative_position = key_pos - query_pos, with its
// fp32 arithmetic (log of a float tensor; the Python scalars enter as fp32) and the truncating
// .to(torch.long).
int64_t RelativePositionBucket(int64_t rel, bool bidirectional, int64_t num_buckets,
                               int64_t max_distance) {
  int64_t bucket = 0;
  if (bidirectional) {
    num_buckets /= 2;
    if (rel > 0) bucket += num_buckets;
    rel = rel < 0 ? -rel : rel;
  } else {
    rel = rel < 0 ? -rel : 0;
  }
  const int64_t max_exact = num_buckets / 2;
  if (rel < max_exact) return bucket + rel;
  const float ratio = static_cast<float>(rel) / static_cast<float>(max_exact);
  const float denom = static_cast<float>(
      std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)));
  const float scaled = std::log(ratio) / denom * static_cast<float>(num_buckets - max_exact);
  const int64_t large = std::min<int64_t>(num_buckets - 1, max_exact + static_cast<int64_t>(scaled));
  return bucket + large;
}

// A tensor of the given shape as fp32.
absl::StatusOr<std::vector<float>> LoadF32(const CheckpointReader& ckpt, const std::string& name,
                                           const std::vector<int64_t>& shape) {
  auto t = ckpt.Get(name, shape);
  if (!t.ok()) return t.status();
  std::vector<float> v((*t)->numel());
  ToF32((*t)->data, (*t)->dtype, v.size(), v.data());
  return v;
}

absl::StatusOr<std::vector<float>> LoadVector(const CheckpointReader& ckpt, const std::string& name,
                                              int64_t n) {
  return LoadF32(ckpt, name, {n});
}

// y = x W^T (+ b) for W [out, in] (PyTorch nn.Linear layout) in fp32. Products are summed in
// double and rounded once: nearer the exact result than fp32 sums, and so nearer transformers'
// fp32 numbers on the oracle (whose BLAS summation order we do not reproduce).
struct Dense {
  int64_t out = 0, in = 0;
  std::vector<float> w, b;
  void Forward(const float* x, int64_t m, float* y) const {
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * in;
      for (int64_t o = 0; o < out; ++o) {
        const float* wo = w.data() + o * in;
        double acc = b.empty() ? 0.0 : b[o];
        for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(xr[i]) * wo[i];
        y[r * out + o] = static_cast<float>(acc);
      }
    }
  }
};

absl::StatusOr<Dense> LoadDense(const CheckpointReader& ckpt, const std::string& name,
                                int64_t out, int64_t in, const std::string& bias = "") {
  auto w = LoadF32(ckpt, name, {out, in});
  if (!w.ok()) return w.status();
  Dense d;
  d.out = out;
  d.in = in;
  d.w = std::move(*w);
  if (!bias.empty()) {
    auto b = LoadVector(ckpt, bias, out);
    if (!b.ok()) return b.status();
    d.b = std::move(*b);
  }
  return d;
}

struct Attention {
  Dense q, k, v, o;
};

struct FeedForward {
  bool sparse = false;
  Dense wi, wo;  // dense
  Dense router;  // sparse: [num_experts, d_model]
  std::vector<Dense> expert_wi, expert_wo;
};

struct Block {
  std::vector<float> ln_self;
  Attention self;
  std::vector<float> ln_cross;  // decoder only
  Attention cross;              // decoder only
  std::vector<float> ln_ff;
  FeedForward ff;
};

struct Stack {
  std::vector<Block> blocks;
  std::vector<float> rel_bias;  // [num_buckets, num_heads]
  std::vector<float> final_ln;
};

absl::Status LoadAttention(const CheckpointReader& ckpt, const std::string& prefix,
                           const SwitchConfig& c, Attention* a) {
  const int64_t inner = c.num_heads * c.d_kv;
  auto q = LoadDense(ckpt, prefix + "q.weight", inner, c.d_model);
  if (!q.ok()) return q.status();
  auto k = LoadDense(ckpt, prefix + "k.weight", inner, c.d_model);
  if (!k.ok()) return k.status();
  auto v = LoadDense(ckpt, prefix + "v.weight", inner, c.d_model);
  if (!v.ok()) return v.status();
  auto o = LoadDense(ckpt, prefix + "o.weight", c.d_model, inner);
  if (!o.ok()) return o.status();
  a->q = std::move(*q);
  a->k = std::move(*k);
  a->v = std::move(*v);
  a->o = std::move(*o);
  return absl::OkStatus();
}

// `prefix` is "encoder.block.I.layer.L." of the feed-forward layer.
absl::Status LoadFeedForward(const CheckpointReader& ckpt, const std::string& prefix,
                             const SwitchConfig& c, bool sparse, FeedForward* f) {
  f->sparse = sparse;
  const std::string router = prefix + "mlp.router.classifier.weight";
  if (!sparse) {
    if (ckpt.Find(router) != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          ckpt.dir(), ": tensor '", router,
          "' is present, but the config's sparse step makes this block dense"));
    }
    auto wi = LoadDense(ckpt, prefix + "mlp.wi.weight", c.d_ff, c.d_model);
    if (!wi.ok()) return wi.status();
    auto wo = LoadDense(ckpt, prefix + "mlp.wo.weight", c.d_model, c.d_ff);
    if (!wo.ok()) return wo.status();
    f->wi = std::move(*wi);
    f->wo = std::move(*wo);
    return absl::OkStatus();
  }
  auto r = LoadDense(ckpt, router, c.num_experts, c.d_model,
                      c.router_bias ? prefix + "mlp.router.classifier.bias" : "");
  if (!r.ok()) return r.status();
  f->router = std::move(*r);
  for (int64_t e = 0; e < c.num_experts; ++e) {
    const std::string ep = absl::StrCat(prefix, "mlp.experts.expert_", e, ".");
    auto wi = LoadDense(ckpt, ep + "wi.weight", c.d_ff, c.d_model);
    if (!wi.ok()) return wi.status();
    auto wo = LoadDense(ckpt, ep + "wo.weight", c.d_model, c.d_ff);
    if (!wo.ok()) return wo.status();
    f->expert_wi.push_back(std::move(*wi));
    f->expert_wo.push_back(std::move(*wo));
  }
  return absl::OkStatus();
}

absl::Status LoadStack(const CheckpointReader& ckpt, const SwitchConfig& c, bool decoder,
                       Stack* s) {
  const std::string name = decoder ? "decoder" : "encoder";
  const int64_t n = decoder ? c.num_decoder_layers : c.num_layers;
  auto rel = LoadF32(ckpt, name + ".block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     {c.relative_attention_num_buckets, c.num_heads});
  if (!rel.ok()) return rel.status();
  s->rel_bias = std::move(*rel);
  s->blocks.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    Block& b = s->blocks[i];
    const std::string bp = absl::StrCat(name, ".block.", i, ".layer.");
    auto ln = LoadVector(ckpt, bp + "0.layer_norm.weight", c.d_model);
    if (!ln.ok()) return ln.status();
    b.ln_self = std::move(*ln);
    absl::Status st = LoadAttention(ckpt, bp + "0.SelfAttention.", c, &b.self);
    if (!st.ok()) return st;
    int ff_layer = 1;
    if (decoder) {
      ln = LoadVector(ckpt, bp + "1.layer_norm.weight", c.d_model);
      if (!ln.ok()) return ln.status();
      b.ln_cross = std::move(*ln);
      st = LoadAttention(ckpt, bp + "1.EncDecAttention.", c, &b.cross);
      if (!st.ok()) return st;
      ff_layer = 2;
    }
    const std::string fp = absl::StrCat(bp, ff_layer, ".");
    ln = LoadVector(ckpt, fp + "layer_norm.weight", c.d_model);
    if (!ln.ok()) return ln.status();
    b.ln_ff = std::move(*ln);
    const bool sparse = decoder ? c.DecoderBlockSparse(i) : c.EncoderBlockSparse(i);
    st = LoadFeedForward(ckpt, fp, c, sparse, &b.ff);
    if (!st.ok()) return st;
  }
  auto fl = LoadVector(ckpt, name + ".final_layer_norm.weight", c.d_model);
  if (!fl.ok()) return fl.status();
  s->final_ln = std::move(*fl);
  return absl::OkStatus();
}

absl::Status CheckIds(const std::vector<int32_t>& ids, int64_t vocab, const char* what) {
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat(what, " is empty"));
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", i, "] = ", ids[i],
                                                     " is outside the vocabulary [0, ", vocab,
                                                     ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool SwitchConfig::EncoderBlockSparse(int64_t i) const {
  return BlockSparse(encoder_sparse_step, i);
}
bool SwitchConfig::DecoderBlockSparse(int64_t i) const {
  return BlockSparse(decoder_sparse_step, i);
}

absl::StatusOr<SwitchConfig> SwitchConfig::FromFile(const std::string& path) {
  auto j = ReadObjectFile(path);
  if (!j.ok()) return j.status();
  Fields f(*j, path);
  const std::string model_type = f.OptString("model_type").value_or("");
  if (!f.status().ok()) return f.status();
  if (model_type != "switch_transformers") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": model_type is '", model_type, "', expected 'switch_transformers'"));
  }
  // transformers derives the activation from feed_forward_proj ("relu", "gated-gelu", ...)
  // when dense_act_fn is absent.
  std::string act = f.OptString("dense_act_fn").value_or("");
  const std::string proj = f.OptString("feed_forward_proj").value_or("relu");
  if (act.empty()) act = proj;
  if (!f.status().ok()) return f.status();
  if (act != "relu" || proj.rfind("gated-", 0) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": dense_act_fn '", act, "' (feed_forward_proj '", proj,
        "') is not supported: switch_transformers models need a non-gated relu"));
  }
  SwitchConfig c;
  c.vocab_size = PositiveInt(f, "vocab_size");
  c.d_model = PositiveInt(f, "d_model");
  c.d_kv = PositiveInt(f, "d_kv");
  c.d_ff = PositiveInt(f, "d_ff");
  c.num_heads = PositiveInt(f, "num_heads");
  c.num_layers = PositiveInt(f, "num_layers");
  c.num_decoder_layers = f.OptInt("num_decoder_layers").value_or(c.num_layers);
  c.num_experts = PositiveInt(f, "num_experts");
  c.relative_attention_num_buckets = f.OptInt("relative_attention_num_buckets").value_or(32);
  c.relative_attention_max_distance = f.OptInt("relative_attention_max_distance").value_or(128);
  c.expert_capacity = f.OptInt("expert_capacity").value_or(64);
  c.layer_norm_epsilon = f.OptNumber("layer_norm_epsilon").value_or(1e-6);
  c.tie_word_embeddings = f.OptBool("tie_word_embeddings").value_or(true);
  c.router_bias = f.OptBool("router_bias").value_or(false);
  c.pad_token_id = FirstTokenId(f, "pad_token_id", 0);
  c.eos_token_id = FirstTokenId(f, "eos_token_id", 1);
  c.decoder_start_token_id = FirstTokenId(f, "decoder_start_token_id", c.pad_token_id);
  // transformers: step = num_layers // num_sparse_layers (num_layers when that is 0), unless
  // the step itself was saved.
  auto step = [&](const char* step_key, const char* count_key, int64_t layers) {
    if (f.Has(step_key)) return f.OptInt(step_key).value_or(0);
    const int64_t count = f.OptInt(count_key).value_or(3);
    return count > 0 ? layers / count : layers;
  };
  c.encoder_sparse_step = step("encoder_sparse_step", "num_sparse_encoder_layers", c.num_layers);
  c.decoder_sparse_step =
      step("decoder_sparse_step", "num_sparse_decoder_layers", c.num_decoder_layers);
  if (!f.status().ok()) return f.status();
  if (c.num_decoder_layers <= 0) f.Fail("field 'num_decoder_layers' must be positive");
  if (c.relative_attention_num_buckets < 4) {
    f.Fail("field 'relative_attention_num_buckets' must be at least 4");
  }
  if (c.relative_attention_max_distance <= c.relative_attention_num_buckets / 4) {
    f.Fail("field 'relative_attention_max_distance' must exceed relative_attention_num_buckets / 4");
  }
  if (c.expert_capacity <= 0) f.Fail("field 'expert_capacity' must be positive");
  if (!(c.layer_norm_epsilon >= 0)) f.Fail("field 'layer_norm_epsilon' must be non-negative");
  if (c.decoder_start_token_id >= c.vocab_size) {
    f.Fail(absl::StrCat("decoder_start_token_id ", c.decoder_start_token_id,
                        " is outside the vocabulary"));
  }
  if (!f.status().ok()) return f.status();
  return c;
}

struct SwitchTransformersModel::Impl {
  SwitchConfig cfg;
  std::vector<float> shared;  // [vocab, d_model]
  Dense lm_head;              // [vocab, d_model]
  Stack encoder, decoder;

  void Embed(const std::vector<int32_t>& ids, std::vector<float>* x) const {
    const int64_t d = cfg.d_model;
    x->resize(ids.size() * d);
    for (size_t t = 0; t < ids.size(); ++t) {
      std::memcpy(x->data() + t * d, shared.data() + static_cast<int64_t>(ids[t]) * d,
                  d * sizeof(float));
    }
  }

  // T5 layer norm: y = w * x / sqrt(mean(x^2) + eps), rows of d_model.
  void Norm(const std::vector<float>& x, const std::vector<float>& w, int64_t rows,
            std::vector<float>* y) const {
    const int64_t d = cfg.d_model;
    y->resize(x.size());
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x.data() + r * d;
      double ss = 0.0;
      for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + cfg.layer_norm_epsilon);
      for (int64_t i = 0; i < d; ++i) {
        (*y)[r * d + i] = static_cast<float>(w[i] * (xr[i] * inv));
      }
    }
  }

  // Position bias [heads, m, n] for m queries and n keys.
  std::vector<float> PositionBias(const Stack& s, int64_t m, int64_t n, bool bidirectional) const {
    const int64_t h = cfg.num_heads;
    std::vector<float> bias(h * m * n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t b = RelativePositionBucket(j - i, bidirectional,
                                                 cfg.relative_attention_num_buckets,
                                                 cfg.relative_attention_max_distance);
        for (int64_t hh = 0; hh < h; ++hh) bias[(hh * m + i) * n + j] = s.rel_bias[b * h + hh];
      }
    }
    return bias;
  }

  // x += o(softmax(q k^T + bias) v) with q from xq [m, d_model], k/v from xkv [n, d_model].
  void AttentionAdd(const Attention& a, const float* xq, int64_t m, const float* xkv, int64_t n,
                    const float* bias, bool causal, float* x) const {
    const int64_t h = cfg.num_heads, dk = cfg.d_kv, inner = h * dk, d = cfg.d_model;
    std::vector<float> q(m * inner), k(n * inner), v(n * inner), ctx(m * inner, 0.0f);
    a.q.Forward(xq, m, q.data());
    a.k.Forward(xkv, n, k.data());
    a.v.Forward(xkv, n, v.data());
    std::vector<double> p(n), acc(dk);
    for (int64_t hh = 0; hh < h; ++hh) {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t len = causal ? std::min(n, i + 1) : n;
        const float* qi = q.data() + i * inner + hh * dk;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < len; ++j) {
          const float* kj = k.data() + j * inner + hh * dk;
          double s = 0.0;
          for (int64_t e = 0; e < dk; ++e) s += static_cast<double>(qi[e]) * kj[e];
          if (bias != nullptr) s += bias[(hh * m + i) * n + j];
          p[j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < len; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < len; ++j) {
          const double w = p[j] / sum;
          const float* vj = v.data() + j * inner + hh * dk;
          for (int64_t e = 0; e < dk; ++e) acc[e] += w * vj[e];
        }
        float* ci = ctx.data() + i * inner + hh * dk;
        for (int64_t e = 0; e < dk; ++e) ci[e] = static_cast<float>(acc[e]);
      }
    }
    std::vector<float> out(m * d);
    a.o.Forward(ctx.data(), m, out.data());
    for (int64_t i = 0; i < m * d; ++i) x[i] += out[i];
  }

  // y = wo(relu(wi(x))) for rows of x [m, d_model].
  void DenseMlp(const Dense& wi, const Dense& wo, const float* x, int64_t m, float* y) const {
    std::vector<float> hid(m * cfg.d_ff);
    wi.Forward(x, m, hid.data());
    for (float& e : hid) e = e > 0.0f ? e : 0.0f;
    wo.Forward(hid.data(), m, y);
  }

  // x += FFN(xn) for xn = LN(x), [m, d_model].
  void FeedForwardAdd(const FeedForward& f, const std::vector<float>& xn, int64_t m,
                      float* x) const {
    const int64_t d = cfg.d_model;
    std::vector<float> out(m * d);
    if (!f.sparse) {
      DenseMlp(f.wi, f.wo, xn.data(), m, out.data());
    } else {
      const int64_t ne = cfg.num_experts;
      std::vector<float> logits(m * ne);
      f.router.Forward(xn.data(), m, logits.data());
      std::vector<int64_t> expert(m);
      std::vector<float> prob(m);
      std::vector<int64_t> load(ne, 0);
      std::vector<std::vector<int64_t>> rows(ne);
      for (int64_t t = 0; t < m; ++t) {
        float* l = logits.data() + t * ne;
        float mx = l[0];
        for (int64_t e = 1; e < ne; ++e) mx = std::max(mx, l[e]);
        float sum = 0.0f;
        for (int64_t e = 0; e < ne; ++e) {
          l[e] = std::exp(l[e] - mx);
          sum += l[e];
        }
        for (int64_t e = 0; e < ne; ++e) l[e] /= sum;
        int64_t best = 0;  // torch.argmax: the first maximum
        for (int64_t e = 1; e < ne; ++e) {
          if (l[e] > l[best]) best = e;
        }
        prob[t] = l[best];
        // Tokens past the expert's capacity (in sequence order) skip the expert.
        if (++load[best] <= cfg.expert_capacity) {
          expert[t] = best;
          rows[best].push_back(t);
        } else {
          expert[t] = -1;
        }
      }
      for (int64_t t = 0; t < m; ++t) {
        if (expert[t] < 0) std::memcpy(out.data() + t * d, xn.data() + t * d, d * sizeof(float));
      }
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t r = static_cast<int64_t>(rows[e].size());
        if (r == 0) continue;
        std::vector<float> in(r * d), y(r * d);
        for (int64_t i = 0; i < r; ++i) {
          std::memcpy(in.data() + i * d, xn.data() + rows[e][i] * d, d * sizeof(float));
        }
        DenseMlp(f.expert_wi[e], f.expert_wo[e], in.data(), r, y.data());
        for (int64_t i = 0; i < r; ++i) {
          std::memcpy(out.data() + rows[e][i] * d, y.data() + i * d, d * sizeof(float));
        }
      }
      for (int64_t t = 0; t < m; ++t) {
        for (int64_t i = 0; i < d; ++i) out[t * d + i] *= prob[t];
      }
    }
    for (int64_t i = 0; i < m * d; ++i) x[i] += out[i];
  }
};

SwitchTransformersModel::SwitchTransformersModel(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
SwitchTransformersModel::~SwitchTransformersModel() = default;

const SwitchConfig& SwitchTransformersModel::config() const { return impl_->cfg; }

absl::StatusOr<std::unique_ptr<SwitchTransformersModel>> SwitchTransformersModel::Load(
    const std::string& dir) {
  auto cfg = SwitchConfig::FromFile(dir + "/config.json");
  if (!cfg.ok()) return cfg.status();
  // generate() takes decoder_start_token_id and eos_token_id from generation_config.json.
  const std::string gen_path = dir + "/generation_config.json";
  auto gen = ReadObjectFile(gen_path);
  if (gen.ok()) {
    Fields f(*gen, gen_path);
    cfg->decoder_start_token_id =
        FirstTokenId(f, "decoder_start_token_id", cfg->decoder_start_token_id);
    cfg->eos_token_id = FirstTokenId(f, "eos_token_id", cfg->eos_token_id);
    if (!f.status().ok()) return f.status();
    if (cfg->decoder_start_token_id >= cfg->vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(gen_path, ": decoder_start_token_id ",
                                                     cfg->decoder_start_token_id,
                                                     " is outside the vocabulary"));
    }
  } else if (!absl::IsNotFound(gen.status())) {
    return gen.status();
  }
  auto ckpt = CheckpointReader::Open(dir);
  if (!ckpt.ok()) return ckpt.status();
  const CheckpointReader& r = **ckpt;
  auto impl = std::make_unique<Impl>();
  impl->cfg = *cfg;
  const SwitchConfig& c = impl->cfg;
  auto shared = LoadF32(r, "shared.weight", {c.vocab_size, c.d_model});
  if (!shared.ok()) return shared.status();
  impl->shared = std::move(*shared);
  if (c.tie_word_embeddings) {
    impl->lm_head.out = c.vocab_size;
    impl->lm_head.in = c.d_model;
    impl->lm_head.w = impl->shared;
  } else {
    auto head = LoadDense(r, "lm_head.weight", c.vocab_size, c.d_model);
    if (!head.ok()) return head.status();
    impl->lm_head = std::move(*head);
  }
  absl::Status st = LoadStack(r, c, /*decoder=*/false, &impl->encoder);
  if (!st.ok()) return st;
  st = LoadStack(r, c, /*decoder=*/true, &impl->decoder);
  if (!st.ok()) return st;
  return std::unique_ptr<SwitchTransformersModel>(new SwitchTransformersModel(std::move(impl)));
}

absl::StatusOr<std::vector<float>> SwitchTransformersModel::Encode(
    const std::vector<int32_t>& input_ids) const {
  const Impl& m = *impl_;
  absl::Status st = CheckIds(input_ids, m.cfg.vocab_size, "input_ids");
  if (!st.ok()) return st;
  const int64_t n = static_cast<int64_t>(input_ids.size());
  std::vector<float> x, h;
  m.Embed(input_ids, &x);
  const std::vector<float> bias = m.PositionBias(m.encoder, n, n, /*bidirectional=*/true);
  for (const Block& b : m.encoder.blocks) {
    m.Norm(x, b.ln_self, n, &h);
    m.AttentionAdd(b.self, h.data(), n, h.data(), n, bias.data(), /*causal=*/false, x.data());
    m.Norm(x, b.ln_ff, n, &h);
    m.FeedForwardAdd(b.ff, h, n, x.data());
  }
  m.Norm(x, m.encoder.final_ln, n, &h);
  return h;
}

absl::StatusOr<std::vector<float>> SwitchTransformersModel::DecoderLogits(
    const std::vector<float>& encoder_out, int64_t n_enc,
    const std::vector<int32_t>& decoder_ids) const {
  const Impl& m = *impl_;
  const SwitchConfig& c = m.cfg;
  if (n_enc <= 0 || static_cast<int64_t>(encoder_out.size()) != n_enc * c.d_model) {
    return absl::InvalidArgumentError(absl::StrCat(
        "encoder output has ", encoder_out.size(), " floats, expected n_enc (", n_enc,
        ", positive) x d_model (", c.d_model, ")"));
  }
  absl::Status st = CheckIds(decoder_ids, c.vocab_size, "decoder_ids");
  if (!st.ok()) return st;
  const int64_t n = static_cast<int64_t>(decoder_ids.size());
  std::vector<float> x, h;
  m.Embed(decoder_ids, &x);
  const std::vector<float> bias = m.PositionBias(m.decoder, n, n, /*bidirectional=*/false);
  for (const Block& b : m.decoder.blocks) {
    m.Norm(x, b.ln_self, n, &h);
    m.AttentionAdd(b.self, h.data(), n, h.data(), n, bias.data(), /*causal=*/true, x.data());
    m.Norm(x, b.ln_cross, n, &h);
    m.AttentionAdd(b.cross, h.data(), n, encoder_out.data(), n_enc, nullptr, /*causal=*/false,
                   x.data());
    m.Norm(x, b.ln_ff, n, &h);
    m.FeedForwardAdd(b.ff, h, n, x.data());
  }
  m.Norm(x, m.decoder.final_ln, n, &h);
  if (c.tie_word_embeddings) {
    const float scale = static_cast<float>(std::pow(static_cast<double>(c.d_model), -0.5));
    for (float& e : h) e *= scale;
  }
  std::vector<float> logits(n * c.vocab_size);
  m.lm_head.Forward(h.data(), n, logits.data());
  return logits;
}

absl::StatusOr<std::vector<int32_t>> SwitchTransformersModel::Greedy(
    const std::vector<int32_t>& input_ids, int64_t max_new_tokens) const {
  const SwitchConfig& c = impl_->cfg;
  if (max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 0, not ", max_new_tokens));
  }
  auto enc = Encode(input_ids);
  if (!enc.ok()) return enc.status();
  const int64_t n_enc = static_cast<int64_t>(input_ids.size());
  std::vector<int32_t> ids = {c.decoder_start_token_id};
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    auto logits = DecoderLogits(*enc, n_enc, ids);
    if (!logits.ok()) return logits.status();
    const float* last = logits->data() + (ids.size() - 1) * c.vocab_size;
    const int32_t next = static_cast<int32_t>(std::max_element(last, last + c.vocab_size) - last);
    ids.push_back(next);
    if (next == c.eos_token_id) break;
  }
  return ids;
}

}  // namespace moemesh
