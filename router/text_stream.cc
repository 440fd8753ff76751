#include "router/text_stream.h"

#include <algorithm>
#include <utility>

namespace moemesh {
namespace {

constexpr char kReplacementChar[] = "\xEF\xBF\xBD";  // U+FFFD.
constexpr size_t kReplacementLen = sizeof(kReplacementChar) - 1;

bool EndsWithReplacementChar(const std::string& s) {
  return s.size() >= kReplacementLen &&
         s.compare(s.size() - kReplacementLen, kReplacementLen,
                   kReplacementChar) == 0;
}

bool IsContinuationByte(char c) {
  return (static_cast<unsigned char>(c) & 0xC0) == 0x80;
}

}  // namespace

TextStream::TextStream(const Tokenizer* tok, std::vector<std::string> stop,
                       bool skip_special, int64_t min_tokens)
    : tok_(tok), skip_special_(skip_special), min_tokens_(min_tokens) {
  for (std::string& s : stop) {
    if (s.empty()) continue;
    max_stop_len_ = std::max(max_stop_len_, s.size());
    stop_.push_back(std::move(s));
  }
}

StreamDelta TextStream::Push(int32_t id) {
  if (stopped_ || finished_) {
    StreamDelta d;
    d.stopped = stopped_;
    return d;
  }
  if (++pushed_ < min_tokens_) {  // stop strings wait for the min_tokens-th token
    StreamDelta d;
    d.text = Detokenize(id);
    text_ += d.text;
    return d;
  }
  return Filter(Detokenize(id), /*flush=*/false);
}

std::string TextStream::Finish() {
  if (stopped_ || finished_) return "";
  finished_ = true;
  return Filter(FlushDetokenizer(), /*flush=*/true).text;
}

std::string TextStream::DecodeRange(size_t begin, size_t end) const {
  return tok_->Decode(
      std::vector<int32_t>(window_.begin() + begin, window_.begin() + end),
      skip_special_);
}

std::string TextStream::Detokenize(int32_t id) {
  // Ids that Decode drops (out of range, unassigned, skipped special tokens)
  // change no decoded text wherever they stand, so they need not enter the
  // window (and a run of them cannot make it grow).
  if (id < 0 || id >= tok_->vocab_size() || tok_->IdToToken(id).empty()) {
    return "";
  }
  if (skip_special_ && tok_->IsSpecial(id) &&
      tok_->Decode({id}, /*skip_special_tokens=*/true).empty()) {
    return "";
  }
  window_.push_back(id);
  std::string text = tok_->Decode(window_, skip_special_);
  // Hold back until the window adds text and does not end in a character
  // whose remaining bytes may still arrive. (Sliding only when text was added
  // also keeps every window starting with ids that have text, so a decoder
  // that strips the leading space of the whole text strips the same
  // character from the window and its prefix.)
  if (text.size() <= prefix_text_.size() || EndsWithReplacementChar(text)) {
    return "";
  }
  std::string delta;
  if (text.compare(0, prefix_text_.size(), prefix_text_) == 0) {
    delta = text.substr(prefix_text_.size());
  } else {
    // Tokenizer::Decode is not always prefix-stable: with ByteFallback, a run
    // of byte tokens that is not valid UTF-8 as a whole becomes one U+FFFD
    // per byte, including bytes of complete characters already emitted. Those
    // cannot be taken back; emit the new ids' own text.
    delta = DecodeRange(read_, window_.size());
  }
  // Slide: the ids just read become the prefix of the next window.
  window_.erase(window_.begin(), window_.begin() + read_);
  read_ = window_.size();
  prefix_text_ = tok_->Decode(window_, skip_special_);
  return delta;
}

std::string TextStream::FlushDetokenizer() {
  if (read_ == window_.size()) return "";
  std::string text = tok_->Decode(window_, skip_special_);
  std::string rest;
  if (text.size() >= prefix_text_.size() &&
      text.compare(0, prefix_text_.size(), prefix_text_) == 0) {
    rest = text.substr(prefix_text_.size());
  } else {
    rest = DecodeRange(read_, window_.size());  // See Detokenize.
  }
  window_.clear();
  read_ = 0;
  prefix_text_.clear();
  return rest;
}

size_t TextStream::HoldBackLength() const {
  if (max_stop_len_ < 2 || held_.empty()) return 0;
  for (size_t k = std::min(held_.size(), max_stop_len_ - 1); k > 0; --k) {
    const size_t start = held_.size() - k;
    for (const std::string& s : stop_) {
      if (s.size() > k && held_.compare(start, k, s, 0, k) == 0) {
        // Keep whole characters (a stop string that starts with a
        // continuation byte could otherwise split one).
        size_t begin = start;
        while (begin > 0 && IsContinuationByte(held_[begin])) --begin;
        return held_.size() - begin;
      }
    }
  }
  return 0;
}

StreamDelta TextStream::Filter(const std::string& incoming, bool flush) {
  StreamDelta d;
  held_ += incoming;
  if (held_.empty()) return d;
  // held_ holds no complete stop string from earlier calls, so the earliest
  // occurrence of any stop string is where the output ends.
  size_t match = std::string::npos;
  for (const std::string& s : stop_) {
    match = std::min(match, held_.find(s));
  }
  if (match != std::string::npos) {
    d.text = held_.substr(0, match);
    d.stopped = true;
    stopped_ = true;
    held_.clear();
    window_.clear();
    read_ = 0;
    prefix_text_.clear();
  } else {
    const size_t keep = flush ? 0 : HoldBackLength();
    d.text = held_.substr(0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
  }
  text_ += d.text;
  return d;
}

}  // namespace moemesh
