// Switch Transformers (Hugging Face SwitchTransformersForConditionalGeneration): a T5-style
// encoder-decoder whose feed-forward layers are, in every `sparse_step`-th block, top-1
// mixtures of experts. In-process, exact fp32, for checkpoints in the Hugging Face layout
// (config.json, model.safetensors). No KV cache: Greedy() recomputes the decoder over the whole
// prefix at every step (the models this serves are small).
//
// The computation, as transformers does it:
//   - Embeddings: `shared.weight` [vocab, d_model] for encoder and decoder inputs.
//   - T5 layer norm: y = w * x / sqrt(mean(x^2) + eps) (no mean subtraction, no bias).
//   - Attention: q, k, v, o without bias, num_heads heads of d_kv; scores = q.k (no 1/sqrt(d))
//     + relative position bias; softmax; o. Pre-norm residual blocks; the decoder's
//     self-attention is causal, its cross-attention (no position bias) reads the encoder output.
//   - Relative position bias: block 0 of each stack holds `relative_attention_bias.weight`
//     [num_buckets, heads], reused by every block of that stack (bidirectional buckets in the
//     encoder, unidirectional in the decoder; transformers' _relative_position_bucket).
//   - Block i of a stack is sparse when (i % step == 1 || step == 1) for step > 0 (transformers'
//     SwitchTransformersStack), else dense: wo(relu(wi(x))). Sparse: router logits
//     (`mlp.router.classifier`), probs = softmax in fp32, expert = argmax (lowest index on ties),
//     out = max(probs) * expert(x); tokens past an expert's capacity (expert_capacity, counted
//     in sequence order) keep x scaled by max(probs).
//   - Final layer norm per stack; LM head tied to `shared.weight` with the decoder output scaled
//     by d_model^-0.5 (tie_word_embeddings), else `lm_head.weight` unscaled.
// Activations are fp32 between operations, as in transformers; inside the matrix products, the
// attention scores/softmax/weighted sums and the layer norms, sums are formed in double and
// rounded once (the closest one can get to transformers' fp32 numbers without reproducing its
// BLAS's summation order: max logit error 8.3e-5 against the oracle, 1.0e-4 with fp32 sums).
#ifndef MOEMESH_ENGINE_SWITCH_MODEL_H_
#define MOEMESH_ENGINE_SWITCH_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moemesh {

// The fields of a switch_transformers config.json that inference needs.
struct SwitchConfig {
  int64_t vocab_size = 0, d_model = 0, d_kv = 0, d_ff = 0, num_heads = 0, num_layers = 0,
          num_decoder_layers = 0, num_experts = 0;
  // A block i is sparse (MoE) when step > 0 and (i % step == 1 || step == 1). Absent from
  // config.json: derived as transformers does, num_layers / num_sparse_*_layers (num_layers
  // when that is 0).
  int64_t encoder_sparse_step = 0, decoder_sparse_step = 0;
  int64_t relative_attention_num_buckets = 32, relative_attention_max_distance = 128;
  int64_t expert_capacity = 64;
  double layer_norm_epsilon = 1e-6;
  bool tie_word_embeddings = true;
  bool router_bias = false;
  int32_t decoder_start_token_id = 0, eos_token_id = 1, pad_token_id = 0;

  // Reads config.json. NotFound if it cannot be opened; InvalidArgument (naming the file and
  // field) for bad JSON, a missing or non-positive size, a model_type other than
  // switch_transformers, or an activation other than relu (dense_act_fn / feed_forward_proj).
  static absl::StatusOr<SwitchConfig> FromFile(const std::string& path);

  // Whether block i of the encoder (decoder) has a mixture-of-experts feed-forward layer.
  bool EncoderBlockSparse(int64_t i) const;
  bool DecoderBlockSparse(int64_t i) const;
};

class SwitchTransformersModel {
 public:
  // `dir` holds config.json and model.safetensors (or shards). NotFound for missing files or
  // tensors, InvalidArgument for a bad config or a tensor of the wrong shape.
  static absl::StatusOr<std::unique_ptr<SwitchTransformersModel>> Load(const std::string& dir);

  ~SwitchTransformersModel();
  SwitchTransformersModel(const SwitchTransformersModel&) = delete;
  SwitchTransformersModel& operator=(const SwitchTransformersModel&) = delete;

  const SwitchConfig& config() const;

  // Encoder output (after the final layer norm): [n, d_model] row-major. InvalidArgument for
  // an empty input or an id outside [0, vocab_size).
  absl::StatusOr<std::vector<float>> Encode(const std::vector<int32_t>& input_ids) const;

  // Logits [m, vocab] for every decoder position, given the encoder output of n_enc rows
  // ([n_enc, d_model]). InvalidArgument for empty decoder ids, ids outside the vocabulary or an
  // encoder output whose size is not n_enc x d_model.
  absl::StatusOr<std::vector<float>> DecoderLogits(const std::vector<float>& encoder_out,
                                                   int64_t n_enc,
                                                   const std::vector<int32_t>& decoder_ids) const;

  // Greedy decoding as transformers' generate(do_sample=False): decoder_start_token_id first,
  // then up to max_new_tokens more (argmax, lowest id on ties), stopping after eos_token_id.
  absl::StatusOr<std::vector<int32_t>> Greedy(const std::vector<int32_t>& input_ids,
                                              int64_t max_new_tokens) const;

 private:
  struct Impl;
  explicit SwitchTransformersModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_SWITCH_MODEL_H_
