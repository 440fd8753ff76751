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

// A UTF-8 sequence's first byte: how many continuation bytes follow and the range of the first
// (overlong forms, surrogates and code points past U+10FFFF excluded); false for a byte no
// character starts with.
bool Utf8Lead(uint8_t c, uint8_t* left, uint8_t* lo, uint8_t* hi) {
  *lo = 0x80;
  *hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    *left = 1;
  } else if (c >= 0xE0 && c <= 0xEF) {
    *left = 2;
    if (c == 0xE0) *lo = 0xA0;
    if (c == 0xED) *hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    *left = 3;
    if (c == 0xF0) *lo = 0x90;
    if (c == 0xF4) *hi = 0x8F;
  } else {
    return false;
  }
  return true;
}

// Whole UTF-8 characters, none a quote, a backslash or a control character.
bool PlainInString(const std::string& b) {
  uint8_t left = 0, lo = 0, hi = 0;
  for (char ch : b) {
    const uint8_t c = static_cast<uint8_t>(ch);
    if (left > 0) {
      if (c < lo || c > hi) return false;
      --left;
      lo = 0x80;
      hi = 0xBF;
    } else if (c < 0x80) {
      if (c == '"' || c == '\\' || c < 0x20) return false;
    } else if (!Utf8Lead(c, &left, &lo, &hi)) {
      return false;
    }
  }
  return left == 0;
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
  if (schema_ != nullptr && depth_ > 0 && stack_[depth_ - 1] == '[' && next_[depth_ - 1] < 65535) {
    ++next_[depth_ - 1];
  }
}

uint16_t JsonState::ExpectedNode() const {
  if (depth_ == 0) return schema_->root();
  const JsonSchema::Node& n = schema_->node(node_[depth_ - 1]);
  if (stack_[depth_ - 1] == '[') return n.items;
  return n.free_object ? n.additional : n.values[next_[depth_ - 1] - 1];
}

uint64_t JsonState::KeyChoices() const {
  const JsonSchema::Node& n = schema_->node(node_[depth_ - 1]);
  uint64_t mask = 0;
  for (size_t i = next_[depth_ - 1]; i < n.keys.size(); ++i) {
    mask |= uint64_t{1} << i;
    if (n.required[i]) break;  // a required property cannot be skipped
  }
  return mask;
}

bool JsonState::MayClose() const {
  const JsonSchema::Node& n = schema_->node(node_[depth_ - 1]);
  if (stack_[depth_ - 1] == '[') return next_[depth_ - 1] >= n.min_items;
  if (n.free_object) return true;
  for (size_t i = next_[depth_ - 1]; i < n.keys.size(); ++i) {
    if (n.required[i]) return false;
  }
  return true;
}

bool JsonState::ChoiceStep(uint8_t c) {
  const JsonSchema::Node& n = schema_->node(choice_node_);
  const std::vector<std::string>& cands = choice_key_ ? n.keys : n.choices;
  uint64_t next = 0;
  bool longer = false;  // a candidate in `next` goes on past this byte
  int whole = -1;       // a candidate read whole before c
  for (uint64_t m = choice_; m != 0; m &= m - 1) {
    const int i = __builtin_ctzll(m);
    const std::string& s = cands[static_cast<size_t>(i)];
    if (s.size() == choice_pos_) {
      whole = i;
    } else if (static_cast<uint8_t>(s[choice_pos_]) == c) {
      next |= uint64_t{1} << i;
      longer = longer || s.size() > choice_pos_ + 1u;
    }
  }
  if (next != 0) {
    choice_ = next;
    ++choice_pos_;
    if (!longer) FinishChoice(__builtin_ctzll(next));  // one candidate, read whole
    return true;
  }
  if (whole < 0) return false;
  // c ends an enum value (1 when 12 was possible too) and is read after it.
  FinishChoice(whole);
  gap_ = 0;
  return Step(c);
}

void JsonState::FinishChoice(int i) {
  if (choice_key_) {
    next_[depth_ - 1] = static_cast<uint16_t>(i + 1);
    mode_ = kColon;
    run_ = 0;
  } else {
    EndValue();
  }
}

bool JsonState::CloseContainer(uint8_t c) {
  if (depth_ == 0 || (c == '}' && stack_[depth_ - 1] != '{') ||
      (c == ']' && stack_[depth_ - 1] != '[') || (c != '}' && c != ']')) {
    return false;
  }
  if (schema_ != nullptr && !MayClose()) return false;
  --depth_;
  EndValue();
  return true;
}

bool JsonState::StartValue(uint8_t c) {
  int node = JsonSchema::kAny;
  if (schema_ != nullptr) {
    node = schema_->Select(ExpectedNode(), c);
    if (node < 0) return false;
    const JsonSchema::Node& n = schema_->node(static_cast<uint16_t>(node));
    const uint8_t kind = JsonSchema::KindOf(c);
    if ((n.kinds & kind) == 0) {  // an enum value
      choice_ = n.choices.size() == 64 ? ~uint64_t{0} : (uint64_t{1} << n.choices.size()) - 1;
      choice_pos_ = 0;
      choice_node_ = static_cast<uint16_t>(node);
      choice_key_ = false;
      mode_ = kChoice;
      return ChoiceStep(c);
    }
    int_only_ = (n.kinds & JsonSchema::kNumber) == 0;
    if (int_only_ && n.int_floor >= 0 && (c == '-' || (n.int_floor == 1 && c == '0'))) {
      return false;  // minimum 0 or 1
    }
  }
  if (c == '{' || c == '[') {
    if (depth_ >= kMaxDepth) return false;
    node_[depth_] = static_cast<uint16_t>(node);
    next_[depth_] = 0;
    stack_[depth_++] = c;
    mode_ = c == '{' ? kKeyOrClose : kValueOrClose;
    return true;
  }
  if (c == '"') {
    mode_ = kString;
    key_ = false;
    str_node_ = static_cast<uint16_t>(node);
    str_len_ = 0;
    format_memo_ = 0;
    if (schema_ != nullptr) {
      const JsonSchema::Node& n = schema_->node(str_node_);
      str_bounded_ = n.min_length > 0 || n.max_length != UINT32_MAX;
    }
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
      if (utf8_left_ > 0) {
        if (c < utf8_lo_ || c > utf8_hi_) return false;
        --utf8_left_;
        utf8_lo_ = 0x80;
        utf8_hi_ = 0xBF;
        return true;
      }
      if (need_low_ && c != '\\') return false;  // a high surrogate's \uDC00-\uDFFF
      if (str_bounded_) {  // minLength / maxLength, in characters (code points)
        const JsonSchema::Node& n = schema_->node(str_node_);
        if (c == '"') {
          if (str_len_ < n.min_length) return false;
        } else if (!need_low_ && (c < 0x80 || (c >= 0xC2 && c <= 0xF4))) {  // a character starts
          if (str_len_ >= n.max_length) return false;
          if (n.format != JsonSchema::Node::kNoFormat &&
              !JsonSchema::FormatByte(n.format, str_len_, c, &format_memo_)) {
            return false;
          }
          ++str_len_;
        }
      }
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
      if (c < 0x80) return c >= 0x20;  // control characters must be escaped
      return Utf8Lead(c, &utf8_left_, &utf8_lo_, &utf8_hi_);
    case kEscape:
      if (c == 'u') {
        mode_ = kUnicode;
        run_ = 0;
        code_ = 0;
        return true;
      }
      if (need_low_) return false;
      if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' ||
          c == 't') {
        mode_ = kString;
        return true;
      }
      return false;
    case kUnicode: {
      if (!IsHex(c)) return false;
      code_ = static_cast<uint16_t>(code_ * 16 + (IsDigit(c) ? c - '0' : (c | 0x20) - 'a' + 10));
      ++run_;
      // Surrogates (D800-DFFF) only in pairs, as JSON parsers insist: a high one, then a low.
      if (run_ == 1 && need_low_ && code_ != 0xD) return false;
      if (run_ == 2) {
        const bool low = code_ >= 0xDC && code_ <= 0xDF;
        if (need_low_ != low) return false;
      }
      if (run_ == 4) {
        mode_ = kString;
        run_ = 0;
        need_low_ = !need_low_ && code_ >= 0xD800 && code_ <= 0xDBFF;
      }
      return true;
    }
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
          if (c == '.' && num_ != kFrac && !int_only_) {
            next = kDot;
          } else if ((c == 'e' || c == 'E') && !int_only_) {
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
    case kChoice:
      return ChoiceStep(c);
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
      if (schema_ != nullptr && !schema_->node(node_[depth_ - 1]).free_object) {
        choice_ = KeyChoices();
        if (choice_ == 0) return false;
        choice_pos_ = 0;
        choice_node_ = node_[depth_ - 1];
        choice_key_ = true;
        mode_ = kChoice;
        return ChoiceStep(c);
      }
      mode_ = kString;
      key_ = true;
      str_node_ = JsonSchema::kAny;
      str_len_ = 0;
      str_bounded_ = false;
      return true;
    case kColon:
      if (c != ':') return false;
      mode_ = kValue;
      return true;
    case kValueOrClose:
      if (c == ']') return CloseContainer(c);
      if (schema_ != nullptr && schema_->node(node_[depth_ - 1]).max_items == 0) return false;
      [[fallthrough]];
    case kValue:
      return StartValue(c);
    case kAfterValue:
      if (c == ',') {
        if (schema_ != nullptr) {
          const JsonSchema::Node& n = schema_->node(node_[depth_ - 1]);
          if (stack_[depth_ - 1] == '[' ? next_[depth_ - 1] >= n.max_items
                                        : !n.free_object && next_[depth_ - 1] >= n.keys.size()) {
            return false;
          }
        }
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
    (PlainInString(b) ? plain_ : special).push_back(static_cast<int32_t>(id));
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
