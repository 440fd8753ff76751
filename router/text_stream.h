// Incremental detokenisation of generated tokens into UTF-8 text deltas, with
// stop strings: what the router streams to a client, one TextStream per
// request.
//
// Detokenisation follows Hugging Face's TextStreamer / vLLM's
// detokenize_incrementally: only a short window of recent ids is decoded per
// token. The window is [prefix offset, end); the ids before the read offset
// have been emitted, and the text of [prefix offset, read offset) is kept so
// that the new text is what decoding the window adds to it. Decoding a window
// that starts with already-emitted ids reproduces the context-dependent parts
// of Tokenizer::Decode (merging of byte tokens, the SentencePiece decoder's
// strip of the leading space of the whole text), so the concatenated deltas
// equal Tokenizer::Decode of all ids.
//
// Text is held back while the decoded window ends in U+FFFD (a character whose
// bytes have not all arrived) and while its tail could be the start of a stop
// string. Each delta is valid UTF-8 ending on a character boundary. A U+FFFD
// that is really in the text (invalid bytes, a literal U+FFFD token) is held
// until a later token or Finish.
//
// One case cannot match Decode of all ids: with ByteFallback, Decode turns a
// whole run of byte tokens into one U+FFFD per byte when the run is not valid
// UTF-8, so a stream that ends (or has invalid bytes) after complete
// byte-fallback characters has already sent those characters; its output
// then ends in U+FFFD for the rest instead.
#ifndef MOEMESH_ROUTER_TEXT_STREAM_H_
#define MOEMESH_ROUTER_TEXT_STREAM_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/tokenizer.h"

namespace moemesh {

struct StreamDelta {
  // New UTF-8 text that is safe to send now (may be empty).
  std::string text;
  // A stop string matched: generation must end. `text` excludes the stop
  // string and everything after it.
  bool stopped = false;
};

// Not thread-safe; one per request. Cost per token is proportional to the
// text of the few most recent ids, not to the length of the whole output.
class TextStream {
 public:
  // `tok` must outlive the stream. `stop`: stop strings (empty ones are
  // ignored). `skip_special`: special tokens contribute no text, as
  // Tokenizer::Decode(ids, skip_special_tokens=true).
  // `min_tokens`: stop strings are looked for from that token's text on (in text that arrives
  // from then; what came before is sent as it comes).
  TextStream(const Tokenizer* tok, std::vector<std::string> stop,
             bool skip_special = true, int64_t min_tokens = 0);

  TextStream(const TextStream&) = delete;
  TextStream& operator=(const TextStream&) = delete;

  // One new generated token. Once a stop string has matched (or after
  // Finish), further calls return empty text (with `stopped` as it stands).
  StreamDelta Push(int32_t id);

  // End of generation other than by a stop string (EOS, length limit): flushes
  // all held-back text. Bytes of a trailing incomplete character come out as
  // the tokenizer decodes them (U+FFFD). A stop string can still match in the
  // flushed text; then the text stops before it and stopped() turns true.
  // Returns "" after a stop string matched or on a second call.
  std::string Finish();

  // All text emitted so far (deltas and Finish).
  const std::string& text() const { return text_; }
  // Whether a stop string has matched.
  bool stopped() const { return stopped_; }

 private:
  // Appends `id` to the window; returns the text it completes (may be empty).
  std::string Detokenize(int32_t id);
  // Text of the ids not yet detokenized, as the tokenizer decodes it.
  std::string FlushDetokenizer();
  // Passes detokenized text through the stop-string filter; `flush`: hold
  // back nothing (end of stream).
  StreamDelta Filter(const std::string& incoming, bool flush);
  // Number of trailing bytes of held_ to keep back: the longest suffix that
  // is a proper prefix of a stop string.
  size_t HoldBackLength() const;
  std::string DecodeRange(size_t begin, size_t end) const;

  const Tokenizer* tok_;
  std::vector<std::string> stop_;  // Non-empty stop strings.
  size_t max_stop_len_ = 0;        // Longest of stop_, in bytes.
  bool skip_special_;
  int64_t min_tokens_ = 0;
  int64_t pushed_ = 0;  // tokens pushed

  std::vector<int32_t> window_;  // Ids from the prefix offset on.
  size_t read_ = 0;              // Window index of the read offset.
  std::string prefix_text_;      // Decode of window_[0, read_).

  std::string held_;  // Detokenized text not emitted yet (stop-string check).
  std::string text_;  // Everything emitted.
  bool stopped_ = false;
  bool finished_ = false;
};

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_TEXT_STREAM_H_
