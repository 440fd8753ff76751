#include "engine/json_constraint.h"

#include <algorithm>
#include <limits>
#include <numeric>

namespace moemesh {
namespace {

constexpr const char* kLiterals[] = {"true", "false", "null"};

bool IsWhitespace(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
bool IsDigit(uint8_t c) { return c >= '0' && c <= '9'; }
bool IsHex(uint8_t c) {
  return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

}  // namespace

bool JsonState::Feed(uint8_t c) {
  JsonState next = *this;
  if (!next.Step(c)) return false;
  *this = next;
  return true;
}

bool JsonState::FeedAll(const std::string& bytes) {
  for (char c : bytes) {
    if (!Feed(static_cast<uint8_t>(c))) return false;
  }
  return true;
}

bool JsonState::Whitespace(uint8_t c) {
  if (c == '\n') {
    if (gap_ != 0) return false;
    gap_ = 2;
    return true;
  }
  if (c != ' ' && c != '\t') return false;  // no carriage returns
  if (gap_ == 0 && c == ' ') {
    gap_ = 1;
    return true;
  }
  if (gap_ < 2 || gap_ - 2 >= kMaxIndent) return false;  // indentation follows a newline
  ++gap_;
  return true;
}

void JsonState::EndValue() {
  mode_ = depth_ == 0 ? kDone : kAfterValue;
  run_ = 0;
}

bool JsonState::CloseContainer(uint8_t c) {
  if (depth_ == 0 || (c == '}' && stack_[depth_ - 1] != '{') ||
      (c == ']' && stack_[depth_ - 1] != '[') || (c != '}' && c != ']')) {
    return false;
  }
  --depth_;
  EndValue();
  return true;
}

bool JsonState::StartValue(uint8_t c) {
  if (c == '{' || c == '[') {
    if (depth_ >= kMaxDepth) return false;
    stack_[depth_++] = c;
    mode_ = c == '{' ? kKeyOrClose : kValueOrClose;
    return true;
  }
  if (c == '"') {
    mode_ = kString;
    key_ = false;
    return true;
  }
  if (c == '-' || IsDigit(c)) {
    mode_ = kNumber;
    num_ = c == '-' ? kMinus : c == '0' ? kZero : kInt;
    run_ = 1;
    return true;
  }
  for (uint8_t i = 0; i < 3; ++i) {
    if (c == static_cast<uint8_t>(kLiterals[i][0])) {
      mode_ = kLiteral;
      literal_ = i;
      pos_ = 1;
      return true;
    }
  }
  return false;
}

bool JsonState::Step(uint8_t c) {
  switch (mode_) {
    case kString:
      if (c == '"') {
        if (key_) {
          key_ = false;
          mode_ = kColon;
          run_ = 0;
        } else {
          EndValue();
        }
        return true;
      }
      if (c == '\\') {
        mode_ = kEscape;
        return true;
      }
      return c >= 0x20;  // control characters must be escaped
    case kEscape:
      if (c == 'u') {
        mode_ = kUnicode;
        run_ = 0;
        return true;
      }
      if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' ||
          c == 't') {
        mode_ = kString;
        return true;
      }
      return false;
    case kUnicode:
      if (!IsHex(c)) return false;
      if (++run_ == 4) {
        mode_ = kString;
        run_ = 0;
      }
      return true;
    case kNumber: {
      Num next = num_;
      bool more = true;  // c continues the number
      switch (num_) {
        case kMinus:
          if (c == '0') {
            next = kZero;
          } else if (IsDigit(c)) {
            next = kInt;
          } else {
            return false;
          }
          break;
        case kZero:
        case kInt:
        case kFrac:
          if (IsDigit(c) && num_ != kZero) break;
          if (c == '.' && num_ != kFrac) {
            next = kDot;
          } else if (c == 'e' || c == 'E') {
            next = kExp;
          } else {
            more = false;
          }
          break;
        case kDot:
          if (!IsDigit(c)) return false;
          next = kFrac;
          break;
        case kExp:
          if (c == '+' || c == '-') {
            next = kExpSign;
          } else if (IsDigit(c)) {
            next = kExpDigits;
          } else {
            return false;
          }
          break;
        case kExpSign:
          if (!IsDigit(c)) return false;
          next = kExpDigits;
          break;
        case kExpDigits:
          more = IsDigit(c);
          break;
      }
      if (more) {
        if (run_ >= kMaxNumberBytes) return false;
        ++run_;
        num_ = next;
        return true;
      }
      // c ends the number and is read after it.
      if (!NumberCanEnd()) return false;
      EndValue();
      gap_ = 0;
      return Step(c);
    }
    case kLiteral: {
      const char* lit = kLiterals[literal_];
      if (c != static_cast<uint8_t>(lit[pos_])) return false;
      if (lit[++pos_] == '\0') EndValue();
      return true;
    }
    case kDone:
      return false;
    default:
      break;
  }
  // Between the grammar's tokens.
  if (IsWhitespace(c)) return Whitespace(c);
  gap_ = 0;
  switch (mode_) {
    case kStart:
      if (c != '{') return false;  // the top level is an object
      return StartValue(c);
    case kKeyOrClose:
      if (c == '}') return CloseContainer(c);
      [[fallthrough]];
    case kKey:
      if (c != '"') return false;
      mode_ = kString;
      key_ = true;
      return true;
    case kColon:
      if (c != ':') return false;
      mode_ = kValue;
      return true;
    case kValueOrClose:
      if (c == ']') return CloseContainer(c);
      [[fallthrough]];
    case kValue:
      return StartValue(c);
    case kAfterValue:
      if (c == ',') {
        mode_ = stack_[depth_ - 1] == '{' ? kKey : kValue;
        return true;
      }
      return CloseContainer(c);
    default:
      return false;
  }
}

TokenTable::Sorted TokenTable::Sort(const std::vector<std::string>& by_id,
                                     std::vector<int32_t> ids) {
  Sorted s;
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return by_id[a] < by_id[b]; });
  s.shared.resize(ids.size(), 0);
  for (size_t i = 1; i < ids.size(); ++i) {
    const std::string &a = by_id[ids[i - 1]], &b = by_id[ids[i]];
    size_t k = 0;
    while (k < a.size() && k < b.size() && a[k] == b[k]) ++k;
    s.shared[i] = static_cast<int32_t>(k);
  }
  s.ids = std::move(ids);
  return s;
}

TokenTable::TokenTable(std::vector<std::string> bytes)
    : vocab_(static_cast<int64_t>(bytes.size())), by_id_(std::move(bytes)) {
  std::vector<int32_t> all, special;
  for (size_t id = 0; id < by_id_.size(); ++id) {
    const std::string& b = by_id_[id];
    if (b.empty()) continue;
    longest_ = std::max(longest_, b.size());
    all.push_back(static_cast<int32_t>(id));
    const bool plain = std::none_of(b.begin(), b.end(), [](char c) {
      return c == '"' || c == '\\' || static_cast<uint8_t>(c) < 0x20;
    });
    (plain ? plain_ : special).push_back(static_cast<int32_t>(id));
  }
  all_ = Sort(by_id_, std::move(all));
  special_ = Sort(by_id_, std::move(special));
}

void TokenTable::Accepted(const JsonState& s, std::vector<uint8_t>* allowed) const {
  if (!s.InString()) {
    Pass(all_, s, allowed);
    return;
  }
  for (int32_t id : plain_) (*allowed)[id] = 1;
  Pass(special_, s, allowed);
}

void TokenTable::Pass(const Sorted& sorted, const JsonState& s,
                      std::vector<uint8_t>* allowed) const {
  // states[k]: s after the first k bytes of the current token; valid for k <= alive, where
  // alive is how many bytes of the last token were accepted (its next byte, if any, was not).
  thread_local std::vector<JsonState> states;
  states.resize(longest_ + 1);
  states[0] = s;
  size_t alive = 0;
  for (size_t i = 0; i < sorted.ids.size(); ++i) {
    const std::string& b = by_id_[sorted.ids[i]];
    const size_t from = static_cast<size_t>(sorted.shared[i]);
    if (from > alive) continue;  // it shares the byte the last token was refused at
    size_t k = from;
    for (; k < b.size(); ++k) {
      states[k + 1] = states[k];
      if (!states[k + 1].Step(static_cast<uint8_t>(b[k]))) break;
    }
    alive = k;
    if (k == b.size()) (*allowed)[sorted.ids[i]] = 1;
  }
}

void JsonConstraint::Mask(float* logits, int64_t vocab) const {
  thread_local std::vector<uint8_t> allowed;
  allowed.assign(static_cast<size_t>(std::max(vocab, table_->vocab())), 0);
  if (!state_.Complete()) table_->Accepted(state_, &allowed);
  const bool any = std::any_of(allowed.begin(), allowed.begin() + vocab,
                               [](uint8_t a) { return a != 0; });
  if (!any) {
    for (int32_t id : end_ids_) {
      if (id >= 0 && id < vocab) allowed[id] = 1;
    }
  }
  for (int64_t id = 0; id < vocab; ++id) {
    if (!allowed[id]) logits[id] = -std::numeric_limits<float>::infinity();
  }
}

void JsonConstraint::Advance(int32_t id) {
  if (id < 0 || id >= table_->vocab()) return;
  state_.FeedAll(table_->bytes(id));
}

}  // namespace moemesh
