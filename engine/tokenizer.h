// Hugging Face `tokenizer.json` tokenizer: BPE models in the byte-level
// (GPT-2 / Qwen / OLMoE) and SentencePiece-converted (Llama / Mixtral,
// byte_fallback) layouts, reproducing what the `tokenizers` library computes.
//
// Supported pipeline components (anything else in the file is rejected with an
// error naming it, rather than tokenizing differently from Hugging Face):
//   normalizer:     null, Sequence, Prepend, Replace (String pattern), NFC
//                   (tables from tools/gen_unicode_tables.py, Unicode 14).
//   pre_tokenizer:  null, Sequence, ByteLevel (use_regex: the GPT-2 regex),
//                   Split (Isolated, with the GPT-2, Qwen2/Qwen3 or Llama-3
//                   regex; each one is implemented by hand, no regex library).
//   model:          BPE (merges as "a b" strings or [a, b] pairs; unk_token,
//                   fuse_unk, byte_fallback, ignore_merges,
//                   continuing_subword_prefix, end_of_word_suffix).
//   post_processor: null, ByteLevel, TemplateProcessing, RobertaProcessing,
//                   BertProcessing, Sequence.
//   decoder:        null, ByteLevel, Sequence, Replace (String pattern),
//                   ByteFallback, Fuse, Strip.
#ifndef MOEMESH_ENGINE_TOKENIZER_H_
#define MOEMESH_ENGINE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace moemesh {

// Hugging Face `tokenizer.json` tokenizer. Immutable after construction; all
// const methods are thread-safe (no shared mutable state: the per-word BPE
// cache lives only for the duration of one Encode call).
class Tokenizer {
 public:
  // Reads and parses `path`. Errors name the path and the problem.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(
      const std::string& path);
  // Parses the text of a tokenizer.json file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view json_text);

  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
  ~Tokenizer();

  // As `tokenizers`' encode(text, add_special_tokens=...): added tokens in the
  // text are split out first and map to their ids; the post-processor adds BOS
  // etc. when add_special_tokens. Bytes that are not valid UTF-8 are kept as
  // single-byte characters of their own (byte-level models encode them as
  // their byte; others fall back to byte tokens or unk).
  std::vector<int32_t> Encode(std::string_view text,
                              bool add_special_tokens = true) const;

  // As decode(ids, skip_special_tokens=...). Ids that are out of range are
  // ignored. Invalid UTF-8 from partial byte sequences becomes U+FFFD as in
  // Hugging Face, so decoding a prefix that ends mid-character is safe (it
  // ends in U+FFFD).
  std::string Decode(const std::vector<int32_t>& ids,
                     bool skip_special_tokens = true) const;

  // Max id + 1 over the vocabulary and the added tokens.
  int32_t vocab_size() const;
  // Id of a vocabulary entry or added token (added tokens take precedence).
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // Raw vocabulary string of `id`; for an added token its content (normalized
  // if the token has normalized=true, as `tokenizers` gives it); "" if out of
  // range or unassigned.
  std::string IdToToken(int32_t id) const;
  // Whether `id` is an added token with special=true.
  bool IsSpecial(int32_t id) const;
  // The bytes `id` adds inside a decoded text: the decoder's steps on this one token, with
  // byte-level and byte-fallback tokens giving their raw bytes (possibly part of a UTF-8
  // character) and no stripping (which applies at the text's start). "" for special tokens and
  // ids out of range. (JSON mode matches these against its grammar.)
  std::string TokenBytes(int32_t id) const;
  // TokenBytes of every id in [0, vocab_size()), indexed by id.
  std::vector<std::string> AllTokenBytes() const;
  // The first id the post-processor puts before the text, if it adds one.
  std::optional<int32_t> bos_id() const;

 private:
  struct AddedToken {
    int32_t id = 0;
    std::string content;
    bool special = false;
    bool normalized = false;
    bool lstrip = false;
    bool rstrip = false;
    bool single_word = false;
  };
  // Matches the added tokens of one kind (normalized or not) in a text,
  // leftmost-longest, like the Aho-Corasick matcher `tokenizers` uses.
  struct AddedMatcher {
    std::vector<std::string> patterns;  // What to find in the text.
    std::vector<int32_t> token_index;   // Index into added_tokens_.
    // first byte -> pattern indices, longest pattern first.
    std::vector<std::vector<int32_t>> by_first_byte;
  };
  struct Segment {
    bool is_token;
    int32_t id;
    size_t begin;
    size_t end;
  };

  struct NormStep {
    enum Kind { kPrepend, kReplace, kNfc } kind;
    std::string a;  // Prepend: the prefix; Replace: the pattern.
    std::string b;  // Replace: the replacement.
  };

  enum class SplitRegex { kGpt2, kQwen, kLlama3 };
  struct PreTokStep {
    enum Kind { kByteLevel, kSplit } kind;
    bool add_prefix_space = false;  // ByteLevel.
    bool use_regex = true;          // ByteLevel.
    SplitRegex regex = SplitRegex::kGpt2;
  };

  struct DecodeStep {
    enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip } kind;
    std::string a;  // Replace: pattern.
    std::string b;  // Replace: content.
    char32_t strip_char = U' ';
    int strip_start = 0;
    int strip_stop = 0;
  };

  using WordCache = absl::flat_hash_map<std::string, std::vector<int32_t>>;

  Tokenizer();
  absl::Status Load(std::string_view json_text);

  std::vector<Segment> FindAddedTokens(std::string_view text,
                                       const AddedMatcher& matcher) const;
  std::string Normalize(std::string_view text) const;
  std::vector<std::string> PreTokenize(std::string_view text) const;
  void EncodeSegment(std::string_view text, WordCache* cache,
                     std::vector<int32_t>* out) const;
  void BpeWord(std::string_view word, std::vector<int32_t>* out) const;

  // Model.
  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;  // Vocab and added tokens, by id.
  // (left id << 32 | right id) -> (rank, merged id).
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  std::vector<int32_t> byte_token_ids_;  // byte -> id of "<0xXX>" or -1.

  // Added tokens.
  std::vector<AddedToken> added_tokens_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  std::vector<bool> is_special_;      // By id.
  std::vector<bool> skip_on_decode_;  // By id: token string is special.
  AddedMatcher raw_matcher_;          // normalized=false tokens.
  AddedMatcher normalized_matcher_;   // normalized=true tokens.

  // Pipeline.
  std::vector<NormStep> normalizer_;
  std::vector<PreTokStep> pre_tokenizer_;
  std::vector<int32_t> prefix_ids_;  // Post-processor, before the text.
  std::vector<int32_t> suffix_ids_;  // Post-processor, after the text.
  bool has_decoder_ = false;
  std::vector<DecodeStep> decoder_;

  int32_t vocab_size_ = 0;
};

// Splits `text` on `separator` into documents, encodes each on its own (no special tokens) and
// appends `end_id` after each: the layout of a held-out perplexity file.
std::vector<int32_t> EncodeDocuments(const Tokenizer& tok, std::string_view text,
                                     std::string_view separator, int32_t end_id);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_TOKENIZER_H_
