// JSON mode (OpenAI's response_format {"type": "json_object"}): the generated text is one JSON
// object, then an end token. A byte-level recognizer of JSON (JsonState) decides which bytes may
// come next; a table of the vocabulary's token bytes (TokenTable) turns that into the tokens
// whose every byte may come next, which the sampler keeps (the rest get -inf logits).
//
// Bounds that keep a sampled text from running away without breaking JSON (small models love
// blank lines): whitespace between the grammar's tokens is one space, or one newline followed by
// at most kMaxIndent spaces or tabs (so compact and pretty-printed JSON both pass); at most
// kMaxDepth nested containers and kMaxNumberBytes bytes in a number (strings are bounded by
// max_tokens only). Nothing may follow the top-level object but an end token.
//
// With a JsonSchema (response_format json_schema) the same recognizer also follows the schema's
// nodes: which kinds of value may start where, the keys of each object in order, enum values,
// array lengths, integers.
#ifndef MOEMESH_ENGINE_JSON_CONSTRAINT_H_
#define MOEMESH_ENGINE_JSON_CONSTRAINT_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/json_schema.h"

namespace moemesh {

// Where a JSON text stands after the bytes fed so far. Copyable (about 200 bytes: the schema
// mode's per-container arrays).
class JsonState {
 public:
  static constexpr int kMaxDepth = 32;
  static constexpr int kMaxIndent = 16;
  static constexpr int kMaxNumberBytes = 32;

  JsonState() = default;
  // Values the schema accepts only (null: any JSON object). The schema must outlive the state.
  explicit JsonState(const JsonSchema* schema) : schema_(schema) {}

  // Reads one more byte; false (and the state unchanged) when no JSON object text continues
  // the ones read with it.
  bool Feed(uint8_t c);
  // Reads all of `bytes`; false at the first one that cannot come next (the state is then left
  // after the bytes before it).
  bool FeedAll(const std::string& bytes);
  // A whole top-level object has been read (only an end token may follow).
  bool Complete() const { return mode_ == kDone; }
  // In a string, between characters (not in an escape or a UTF-8 sequence): any complete UTF-8
  // characters but a quote, a backslash or a control character keep it so.
  // Not with a schema's maxLength on the string (every character then counts).
  bool InString() const {
    return mode_ == kString && utf8_left_ == 0 && !need_low_ &&
           (!str_bounded_ || schema_->node(str_node_).max_length == UINT32_MAX);
  }

 private:
  enum Mode : uint8_t {
    kStart,         // before the top-level '{'
    kKeyOrClose,    // after '{': a key or '}'
    kKey,           // after ',' in an object: a key
    kColon,         // after a key
    kValue,         // after ':' or ',' in an array: a value
    kValueOrClose,  // after '[': a value or ']'
    kAfterValue,    // ',' or the container's closing bracket
    kString,        // in a string (key or value)
    kEscape,        // after a backslash in a string
    kUnicode,       // in the 4 hex digits of \u
    kNumber,        // in a number (num_ says where)
    kLiteral,       // in true, false or null
    kChoice,        // in an enum value or a schema object's key (choice_ says which remain)
    kDone,          // after the top-level object
  };
  // Where a number stands: after '-', after a leading 0, in integer digits, after '.', in
  // fraction digits, after 'e', after the exponent's sign, in exponent digits.
  enum Num : uint8_t { kMinus, kZero, kInt, kDot, kFrac, kExp, kExpSign, kExpDigits };

  friend class TokenTable;
  bool Step(uint8_t c);             // Feed without the rollback: the state is garbage on false
  bool Whitespace(uint8_t c);       // one whitespace byte between tokens; false past the bounds
  bool StartValue(uint8_t c);       // c begins a value (in kValue / kValueOrClose)
  bool CloseContainer(uint8_t c);   // c is '}' or ']' closing the innermost container
  void EndValue();                  // a value ended: kAfterValue, or kDone at the top
  // Schema mode.
  uint16_t ExpectedNode() const;     // the node of the value that may start here
  uint64_t KeyChoices() const;       // the keys that may come next in the innermost object
  bool MayClose() const;             // the innermost container may close here
  bool ChoiceStep(uint8_t c);        // one byte of an enum value or key
  void FinishChoice(int i);          // candidate i was read whole
  bool NumberCanEnd() const {
    return num_ == kZero || num_ == kInt || num_ == kFrac || num_ == kExpDigits;
  }

  Mode mode_ = kStart;
  Num num_ = kMinus;
  bool key_ = false;           // the string being read is an object key
  uint8_t depth_ = 0;          // open containers
  uint8_t run_ = 0;            // hex digits of \u; number bytes
  uint8_t gap_ = 0;            // whitespace since the last token: 0 none, 1 a space, 2 + n a
                               // newline and n indentation bytes
  uint8_t literal_ = 0;        // kLiteral: index into kLiterals, and pos_ the bytes matched
  uint8_t pos_ = 0;
  // In a string: continuation bytes the UTF-8 character needs yet, and the range of the next.
  uint8_t utf8_left_ = 0, utf8_lo_ = 0, utf8_hi_ = 0;
  // \u escapes: the hex digits' value so far; after a high surrogate, a low one must follow.
  uint16_t code_ = 0;
  bool need_low_ = false;
  // Schema mode: the string's node (its min/max length) and the characters read so far.
  uint16_t str_node_ = 0;
  bool str_bounded_ = false;  // the node has a minLength or maxLength
  uint32_t str_len_ = 0;
  uint32_t format_memo_ = 0;  // JsonSchema::FormatByte's
  std::array<uint8_t, kMaxDepth> stack_{};  // '{' or '[' per open container
  // Schema mode: per open container its node, and for an object the index of the first
  // property that may come next (after the last one written), for an array the values so far
  // (saturating at 65535); the candidates of a kChoice (bits), how many bytes they matched, the
  // node they belong to and whether they are keys; whether the number being read is an integer.
  const JsonSchema* schema_ = nullptr;
  std::array<uint16_t, kMaxDepth> node_{};
  std::array<uint16_t, kMaxDepth> next_{};
  uint64_t choice_ = 0;
  uint16_t choice_pos_ = 0;
  uint16_t choice_node_ = 0;
  bool choice_key_ = false;
  bool int_only_ = false;
};

// The vocabulary's tokens as bytes, sorted, with the length each shares with the one before: one
// pass over it finds every token a JsonState accepts, feeding each byte once per distinct
// prefix. Inside a string, tokens of whole UTF-8 characters with no quote, backslash or control
// character are accepted without feeding (they cannot end or break it) and the pass covers only
// the others. Built once per tokenizer; const after construction, shared by every sequence.
class TokenTable {
 public:
  // bytes[id]: what token id adds to a text (empty: never allowed in JSON mode, e.g. special
  // tokens).
  explicit TokenTable(std::vector<std::string> bytes);
  int64_t vocab() const { return vocab_; }
  // Sets allowed[id] = 1 for every token whose bytes `s` accepts whole (others untouched).
  void Accepted(const JsonState& s, std::vector<uint8_t>* allowed) const;
  // The bytes of token id ("" when it has none).
  const std::string& bytes(int32_t id) const { return by_id_[id]; }

 private:
  // Tokens in the order of their bytes, and how many bytes each shares with the one before.
  struct Sorted {
    std::vector<int32_t> ids, shared;
  };
  static Sorted Sort(const std::vector<std::string>& by_id, std::vector<int32_t> ids);
  void Pass(const Sorted& sorted, const JsonState& s, std::vector<uint8_t>* allowed) const;

  int64_t vocab_ = 0;
  std::vector<std::string> by_id_;
  Sorted all_;                  // every token with bytes
  Sorted special_;              // those with a quote, backslash or control byte
  std::vector<int32_t> plain_;  // the others
  size_t longest_ = 0;
};

// One sequence's JSON mode: its JsonState over the tokens generated so far, and the end tokens
// allowed once the object is complete.
class JsonConstraint {
 public:
  // schema: null for any JSON object.
  JsonConstraint(const TokenTable* table, std::vector<int32_t> end_ids,
                 std::shared_ptr<const JsonSchema> schema = nullptr)
      : table_(table), end_ids_(std::move(end_ids)), schema_(std::move(schema)),
        state_(schema_.get()) {}
  // Sets every token that cannot come next to -inf in logits[0, vocab). When no token can (a
  // vocabulary that cannot continue the text), the end tokens stay allowed, so the sequence
  // stops.
  void Mask(float* logits, int64_t vocab) const;
  // Reads the chosen token (an end token or a rejected one changes nothing).
  void Advance(int32_t id);
  bool Complete() const { return state_.Complete(); }

 private:
  const TokenTable* const table_;
  const std::vector<int32_t> end_ids_;
  const std::shared_ptr<const JsonSchema> schema_;
  JsonState state_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_JSON_CONSTRAINT_H_
