#include "engine/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/unicode_tables.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

// Debian's Abseil has its own string_view type: heterogeneous lookups in
// flat_hash_map<std::string, ...> need one.
absl::string_view AV(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}

constexpr char kReplacementChar[] = "\xEF\xBF\xBD";  // U+FFFD.
constexpr uint32_t kInvalidCp = 0x110000;  // A byte that is not valid UTF-8.

// ---------------------------------------------------------------------------
// UTF-8 and Unicode classes.

// Decodes the character at s[i]; strict (no overlongs, surrogates or values
// past U+10FFFF). A byte that does not start a valid sequence decodes as
// kInvalidCp with length 1.
uint32_t DecodeUtf8(std::string_view s, size_t i, size_t* len) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t c = byte(i);
  *len = 1;
  if (c < 0x80) return c;
  size_t need;
  uint32_t cp;
  uint8_t lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    cp = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    cp = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return kInvalidCp;
  }
  if (i + need >= s.size()) return kInvalidCp;  // Truncated.
  for (size_t k = 1; k <= need; ++k) {
    const uint8_t d = byte(i + k);
    const uint8_t l = k == 1 ? lo : 0x80;
    const uint8_t h = k == 1 ? hi : 0xBF;
    if (d < l || d > h) return kInvalidCp;
    cp = (cp << 6) | (d & 0x3F);
  }
  *len = need + 1;
  return cp;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Rust's String::from_utf8_lossy: each maximal invalid subpart (a truncated
// sequence counts as one) becomes one U+FFFD.
std::string Utf8Lossy(std::string_view b) {
  std::string out;
  out.reserve(b.size());
  size_t i = 0;
  while (i < b.size()) {
    const uint8_t c = static_cast<uint8_t>(b[i]);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
      ++i;
      continue;
    }
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      out += kReplacementChar;
      ++i;
      continue;
    }
    size_t j = i + 1;
    size_t k = 0;
    for (; k < need && j < b.size(); ++k, ++j) {
      const uint8_t d = static_cast<uint8_t>(b[j]);
      const uint8_t l = k == 0 ? lo : 0x80;
      const uint8_t h = k == 0 ? hi : 0xBF;
      if (d < l || d > h) break;
    }
    if (k == need) {
      out.append(b.substr(i, need + 1));
    } else {
      out += kReplacementChar;
    }
    i = j;
  }
  return out;
}

bool IsValidUtf8(std::string_view b) {
  size_t i = 0;
  while (i < b.size()) {
    size_t len;
    if (DecodeUtf8(b, i, &len) == kInvalidCp) return false;
    i += len;
  }
  return true;
}

// Character classes of the pre-tokenizer regexes.
enum CharClass : uint8_t {
  kOther = 0,   // [^\s\p{L}\p{N}]
  kLetter = 1,  // \p{L}
  kNumber = 2,  // \p{N}
  kSpace = 3,   // \s
};

template <size_t N>
bool InRanges(const unicode_tables::CodepointRange (&ranges)[N], uint32_t cp) {
  const auto* it =
      std::upper_bound(ranges, ranges + N, cp,
                       [](uint32_t v, const unicode_tables::CodepointRange& r) {
                         return v < r.lo;
                       });
  if (it == ranges) return false;
  --it;
  return cp <= it->hi;
}

uint8_t Classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return kLetter;
    if (cp >= '0' && cp <= '9') return kNumber;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return kSpace;
    return kOther;
  }
  if (cp >= kInvalidCp) return kOther;
  if (InRanges(unicode_tables::kLetterRanges, cp)) return kLetter;
  if (InRanges(unicode_tables::kNumberRanges, cp)) return kNumber;
  if (InRanges(unicode_tables::kSpaceRanges, cp)) return kSpace;
  return kOther;
}

// ---------------------------------------------------------------------------
// NFC (canonical decomposition, canonical ordering, canonical composition),
// from the tables in unicode_tables.h plus the Hangul algorithm.

constexpr uint32_t kHangulS = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161,
                   kHangulT = 0x11A7;
constexpr uint32_t kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr uint32_t kHangulNCount = kHangulVCount * kHangulTCount;
constexpr uint32_t kHangulSCount = kHangulLCount * kHangulNCount;

uint8_t CombiningClass(uint32_t cp) {
  if (cp < 0x300) return 0;
  const auto& r = unicode_tables::kCombiningClassRanges;
  const auto* it = std::upper_bound(
      std::begin(r), std::end(r), cp,
      [](uint32_t v, const unicode_tables::CombiningClassRange& x) {
        return v < x.lo;
      });
  if (it == std::begin(r)) return 0;
  --it;
  return cp <= it->hi ? it->ccc : 0;
}

const unicode_tables::CanonicalDecomposition* FindDecomposition(uint32_t cp) {
  const auto& d = unicode_tables::kCanonicalDecompositions;
  const auto* it =
      std::lower_bound(std::begin(d), std::end(d), cp,
                       [](const unicode_tables::CanonicalDecomposition& x,
                          uint32_t v) { return x.cp < v; });
  return (it != std::end(d) && it->cp == cp) ? it : nullptr;
}

void Decompose(uint32_t cp, std::vector<uint32_t>* out) {
  if (cp >= kHangulS && cp < kHangulS + kHangulSCount) {
    const uint32_t s = cp - kHangulS;
    out->push_back(kHangulL + s / kHangulNCount);
    out->push_back(kHangulV + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount != 0) out->push_back(kHangulT + s % kHangulTCount);
    return;
  }
  const unicode_tables::CanonicalDecomposition* d =
      cp < 0xC0 ? nullptr : FindDecomposition(cp);
  if (d == nullptr) {
    out->push_back(cp);
    return;
  }
  Decompose(d->first, out);
  if (d->second != 0) Decompose(d->second, out);
}

// (first << 32 | second) -> primary composite.
const absl::flat_hash_map<uint64_t, uint32_t>& Compositions() {
  static const auto* map = [] {
    auto* m = new absl::flat_hash_map<uint64_t, uint32_t>();
    for (const auto& d : unicode_tables::kCanonicalDecompositions) {
      if (d.composes) {
        (*m)[(static_cast<uint64_t>(d.first) << 32) | d.second] = d.cp;
      }
    }
    return m;
  }();
  return *map;
}

// Returns the primary composite of (a, b), or 0.
uint32_t Compose(uint32_t a, uint32_t b) {
  if (a >= kHangulL && a < kHangulL + kHangulLCount && b >= kHangulV &&
      b < kHangulV + kHangulVCount) {
    return kHangulS +
           ((a - kHangulL) * kHangulVCount + (b - kHangulV)) * kHangulTCount;
  }
  if (a >= kHangulS && a < kHangulS + kHangulSCount &&
      (a - kHangulS) % kHangulTCount == 0 && b > kHangulT &&
      b < kHangulT + kHangulTCount) {
    return a + (b - kHangulT);
  }
  const auto& m = Compositions();
  auto it = m.find((static_cast<uint64_t>(a) << 32) | b);
  return it == m.end() ? 0 : it->second;
}

// Unicode NFC. Bytes that are not valid UTF-8 are kept as they are and act as
// starters that nothing composes with.
std::string Nfc(std::string_view s) {
  // Fast path: nothing below U+0300 changes under NFC, and text below U+00C0
  // has no decompositions; in UTF-8 those are bytes < 0xCC.
  bool simple = true;
  for (char ch : s) {
    if (static_cast<uint8_t>(ch) >= 0xCC) {
      simple = false;
      break;
    }
  }
  if (simple) return std::string(s);
  constexpr uint32_t kRawByte = 0x80000000u;  // Marks an invalid byte.
  std::vector<uint32_t> cps;
  cps.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t len;
    const uint32_t cp = DecodeUtf8(s, i, &len);
    if (cp == kInvalidCp) {
      cps.push_back(kRawByte | static_cast<uint8_t>(s[i]));
    } else {
      Decompose(cp, &cps);
    }
    i += len;
  }
  const auto ccc = [](uint32_t cp) -> uint8_t {
    return (cp & kRawByte) ? 0 : CombiningClass(cp);
  };
  // Canonical ordering: stable sort of each run of non-starters by class.
  for (size_t k = 0; k < cps.size();) {
    if (ccc(cps[k]) == 0) {
      ++k;
      continue;
    }
    size_t e = k;
    while (e < cps.size() && ccc(cps[e]) != 0) ++e;
    std::stable_sort(cps.begin() + k, cps.begin() + e,
                     [&](uint32_t a, uint32_t b) { return ccc(a) < ccc(b); });
    k = e;
  }
  // Canonical composition.
  std::string out;
  out.reserve(s.size());
  if (!cps.empty()) {
    size_t starter = 0;
    int last_class = ccc(cps[0]) == 0 ? 0 : 256;
    size_t w = 1;
    for (size_t r = 1; r < cps.size(); ++r) {
      const uint32_t ch = cps[r];
      const int cls = ccc(ch);
      const bool can_compose = (last_class < cls || last_class == 0) &&
                               !(cps[starter] & kRawByte) && !(ch & kRawByte) &&
                               ccc(cps[starter]) == 0;
      const uint32_t composite = can_compose ? Compose(cps[starter], ch) : 0;
      if (composite != 0) {
        cps[starter] = composite;
        continue;
      }
      if (cls == 0) starter = w;
      last_class = cls;
      cps[w++] = ch;
    }
    cps.resize(w);
  }
  for (uint32_t cp : cps) {
    if (cp & kRawByte) {
      out.push_back(static_cast<char>(cp & 0xFF));
    } else {
      AppendUtf8(cp, &out);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Pre-tokenizer regexes, implemented by hand as the backtracking regex engine
// (Oniguruma, in `tokenizers`) evaluates them: at each position the first
// alternative that matches wins, quantifiers are greedy.

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct Ch {
  uint32_t cp;
  uint32_t off;  // Byte offset in the text.
  uint8_t cls;
};

// c has n characters plus a sentinel holding the end offset.
std::vector<Ch> DecodeChars(std::string_view s) {
  std::vector<Ch> c;
  c.reserve(s.size() + 1);
  size_t i = 0;
  while (i < s.size()) {
    size_t len;
    const uint32_t cp = DecodeUtf8(s, i, &len);
    c.push_back({cp, static_cast<uint32_t>(i), Classify(cp)});
    i += len;
  }
  c.push_back({0, static_cast<uint32_t>(s.size()), kOther});
  return c;
}

size_t RunEnd(const std::vector<Ch>& c, size_t n, size_t p, uint8_t cls) {
  while (p < n && c[p].cls == cls) ++p;
  return p;
}

// `\s+(?!\S)|\s+` at i, where c[i] is whitespace.
size_t MatchTrailingSpace(const std::vector<Ch>& c, size_t n, size_t i) {
  const size_t j = RunEnd(c, n, i, kSpace);
  if (j == n) return n;         // \s+ up to the end: (?!\S) holds.
  if (j - 1 > i) return j - 1;  // Leave the last space for the next token.
  return j;                     // \s+ alone.
}

// 's|'t|'re|'ve|'m|'ll|'d (case-insensitive if `fold`) at i, or 0.
size_t MatchContraction(const std::vector<Ch>& c, size_t n, size_t i,
                        bool fold) {
  if (c[i].cp != '\'' || i + 1 >= n) return 0;
  const auto lower = [fold](uint32_t cp) -> uint32_t {
    if (!fold) return cp;
    if (cp >= 'A' && cp <= 'Z') return cp + 32;
    if (cp == 0x17F) return 's';  // LATIN SMALL LETTER LONG S folds to 's'.
    return cp;
  };
  const uint32_t a = lower(c[i + 1].cp);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
  if (i + 2 >= n) return 0;
  const uint32_t b = lower(c[i + 2].cp);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') ||
      (a == 'l' && b == 'l')) {
    return i + 3;
  }
  return 0;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
// ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t MatchGpt2(const std::vector<Ch>& c, size_t n, size_t i) {
  if (size_t e = MatchContraction(c, n, i, /*fold=*/false)) return e;
  const size_t p = (c[i].cp == ' ' && i + 1 < n) ? i + 1 : i;
  const uint8_t cls = c[p].cls;
  if (cls != kSpace) return RunEnd(c, n, p, cls);
  return MatchTrailingSpace(c, n, i);
}

// Qwen2 / Qwen3 (max_digits 1) and Llama 3 (max_digits 3):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t MatchQwen(const std::vector<Ch>& c, size_t n, size_t i,
                 size_t max_digits) {
  if (size_t e = MatchContraction(c, n, i, /*fold=*/true)) return e;
  const uint8_t cls = c[i].cls;
  const auto is_newline = [&](size_t k) {
    return c[k].cp == '\r' || c[k].cp == '\n';
  };
  if (cls == kLetter) return RunEnd(c, n, i, kLetter);
  if (cls != kNumber && !is_newline(i) && i + 1 < n &&
      c[i + 1].cls == kLetter) {
    return RunEnd(c, n, i + 1, kLetter);
  }
  if (cls == kNumber) {
    size_t e = i + 1;
    while (e < n && e - i < max_digits && c[e].cls == kNumber) ++e;
    return e;
  }
  const size_t p = (c[i].cp == ' ' && i + 1 < n) ? i + 1 : i;
  if (c[p].cls == kOther) {
    size_t e = RunEnd(c, n, p, kOther);
    while (e < n && is_newline(e)) ++e;
    return e;
  }
  // c[i] is whitespace. \s*[\r\n]+: up to the last newline of the run.
  const size_t j = RunEnd(c, n, i, kSpace);
  for (size_t k = j; k > i; --k) {
    if (is_newline(k - 1)) return k;
  }
  return MatchTrailingSpace(c, n, i);
}

// ---------------------------------------------------------------------------
// Byte-level (GPT-2) byte <-> character mapping.

struct ByteLevelTables {
  std::string byte_to_str[256];
  int16_t char_to_byte[324];
  ByteLevelTables() {
    std::fill(std::begin(char_to_byte), std::end(char_to_byte), -1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : next++;
      AppendUtf8(cp, &byte_to_str[b]);
      char_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelTables& ByteLevel() {
  static const ByteLevelTables* tables = new ByteLevelTables();
  return *tables;
}

std::string ByteLevelEncode(std::string_view s) {
  const ByteLevelTables& t = ByteLevel();
  std::string out;
  out.reserve(s.size() * 2);
  for (char ch : s) out += t.byte_to_str[static_cast<uint8_t>(ch)];
  return out;
}

// Appends the bytes a byte-level token stands for; a token with a character
// outside the mapping contributes its own UTF-8 bytes (as `tokenizers` does).
void ByteLevelDecodeToken(std::string_view token, std::string* out) {
  const ByteLevelTables& t = ByteLevel();
  const size_t start = out->size();
  size_t i = 0;
  while (i < token.size()) {
    size_t len;
    const uint32_t cp = DecodeUtf8(token, i, &len);
    if (cp >= 324 || t.char_to_byte[cp] < 0) {
      out->resize(start);
      out->append(token);
      return;
    }
    out->push_back(static_cast<char>(t.char_to_byte[cp]));
    i += len;
  }
}

// A byte-fallback token "<0xAB>": its byte.
bool ByteFallbackByte(const std::string& t, char* byte) {
  const auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>' || hex(t[3]) < 0 ||
      hex(t[4]) < 0) {
    return false;
  }
  *byte = static_cast<char>(hex(t[3]) * 16 + hex(t[4]));
  return true;
}

void ReplaceAll(std::string_view s, std::string_view from, std::string_view to,
                std::string* out) {
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out->append(s.substr(pos, hit - pos));
    out->append(to);
    pos = hit + from.size();
  }
  out->append(s.substr(pos));
}

// ---------------------------------------------------------------------------
// JSON helpers. nlohmann::json may throw; Load() catches and converts.

absl::Status Invalid(const std::string& what) {
  return absl::InvalidArgumentError(what);
}

std::string TypeOf(const json& j) {
  if (j.is_object() && j.contains("type") && j["type"].is_string()) {
    return j["type"].get<std::string>();
  }
  return "";
}

bool GetBool(const json& j, const char* key, bool dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  return j[key].get<bool>();
}

std::string GetString(const json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "";
  return j[key].get<std::string>();
}

// A `pattern` field: {"String": s} gives s; a Regex pattern is reported.
absl::StatusOr<std::string> StringPattern(const json& j,
                                          const std::string& where) {
  if (!j.contains("pattern") || !j["pattern"].is_object()) {
    return Invalid(absl::StrCat(where, ": missing pattern"));
  }
  const json& p = j["pattern"];
  if (p.contains("String")) {
    std::string s = p["String"].get<std::string>();
    if (s.empty()) return Invalid(absl::StrCat(where, ": empty pattern"));
    return s;
  }
  return Invalid(absl::StrCat(where, ": unsupported pattern ", p.dump(),
                              " (only String patterns are supported)"));
}

}  // namespace

// ---------------------------------------------------------------------------
// Loading.

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(
    const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open tokenizer file '",
                                            path, "': ", std::strerror(errno)));
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) {
    return absl::DataLossError(
        absl::StrCat("error reading tokenizer file '", path, "'"));
  }
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  absl::Status s = t->Load(buf.str());
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view json_text) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  absl::Status s = t->Load(json_text);
  if (!s.ok()) {
    return absl::Status(s.code(),
                        absl::StrCat("tokenizer.json: ", s.message()));
  }
  return t;
}

absl::Status Tokenizer::Load(std::string_view json_text) {
  json root;
  try {
    root = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    return Invalid(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return Invalid("top level is not a JSON object");

  // Which part is being read, for errors that nlohmann::json throws.
  const char* section = "model";
  try {
    // ---- Model.
    if (!root.contains("model") || !root["model"].is_object()) {
      return Invalid("missing \"model\" object");
    }
    const json& model = root["model"];
    std::string model_type = TypeOf(model);
    if (model_type.empty() && model.contains("merges")) model_type = "BPE";
    if (model_type != "BPE") {
      return Invalid(absl::StrCat("unsupported model type '", model_type,
                                  "' (only BPE is supported)"));
    }
    if (!model.contains("vocab") || !model["vocab"].is_object()) {
      return Invalid("model has no \"vocab\" object");
    }
    if (model.contains("dropout") && !model["dropout"].is_null() &&
        model["dropout"].get<double>() > 0.0) {
      return Invalid("BPE dropout is not supported");
    }
    int64_t max_id = -1;
    for (const auto& [token, id_json] : model["vocab"].items()) {
      const int64_t id = id_json.get<int64_t>();
      if (id < 0 || id > INT32_MAX - 1) {
        return Invalid(
            absl::StrCat("vocab id ", id, " of '", token, "' out of range"));
      }
      vocab_[token] = static_cast<int32_t>(id);
      max_id = std::max(max_id, id);
    }
    continuing_subword_prefix_ = GetString(model, "continuing_subword_prefix");
    end_of_word_suffix_ = GetString(model, "end_of_word_suffix");
    fuse_unk_ = GetBool(model, "fuse_unk", false);
    byte_fallback_ = GetBool(model, "byte_fallback", false);
    ignore_merges_ = GetBool(model, "ignore_merges", false);
    const std::string unk = GetString(model, "unk_token");
    if (!unk.empty()) {
      auto it = vocab_.find(unk);
      if (it == vocab_.end()) {
        return Invalid(absl::StrCat("unk_token '", unk, "' is not in vocab"));
      }
      unk_id_ = it->second;
    }
    byte_token_ids_.assign(256, -1);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = vocab_.find(name);
      if (it != vocab_.end()) byte_token_ids_[b] = it->second;
    }
    if (model.contains("merges") && !model["merges"].is_null()) {
      const json& merges = model["merges"];
      if (!merges.is_array()) return Invalid("model.merges is not an array");
      merges_.reserve(merges.size());
      const size_t prefix_len = continuing_subword_prefix_.size();
      for (size_t rank = 0; rank < merges.size(); ++rank) {
        const json& m = merges[rank];
        std::string a, b;
        if (m.is_string()) {
          const std::string s = m.get<std::string>();
          const size_t sp = s.find(' ');
          if (sp == std::string::npos ||
              s.find(' ', sp + 1) != std::string::npos) {
            return Invalid(
                absl::StrCat("merge ", rank, " '", s, "' is not two tokens"));
          }
          a = s.substr(0, sp);
          b = s.substr(sp + 1);
        } else if (m.is_array() && m.size() == 2) {
          a = m[0].get<std::string>();
          b = m[1].get<std::string>();
        } else {
          return Invalid(
              absl::StrCat("merge ", rank, " is malformed: ", m.dump()));
        }
        const std::string merged = a + b.substr(std::min(prefix_len, b.size()));
        auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(merged);
        if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end()) {
          return Invalid(absl::StrCat("merge ", rank, " ('", a, "', '", b,
                                      "') uses a token not in vocab"));
        }
        const uint64_t key = (static_cast<uint64_t>(ia->second) << 32) |
                             static_cast<uint32_t>(ib->second);
        merges_[key] = {static_cast<int32_t>(rank), im->second};
      }
    }

    // ---- Added tokens.
    section = "added_tokens";
    if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
      if (!root["added_tokens"].is_array()) {
        return Invalid("added_tokens is not an array");
      }
      for (const json& a : root["added_tokens"]) {
        AddedToken t;
        if (!a.contains("id") || !a.contains("content")) {
          return Invalid(
              absl::StrCat("added token without id or content: ", a.dump()));
        }
        const int64_t id = a["id"].get<int64_t>();
        if (id < 0 || id > INT32_MAX - 1) {
          return Invalid(absl::StrCat("added token id ", id, " out of range"));
        }
        t.id = static_cast<int32_t>(id);
        t.content = a["content"].get<std::string>();
        t.special = GetBool(a, "special", false);
        t.normalized = GetBool(a, "normalized", !t.special);
        t.lstrip = GetBool(a, "lstrip", false);
        t.rstrip = GetBool(a, "rstrip", false);
        t.single_word = GetBool(a, "single_word", false);
        max_id = std::max(max_id, id);
        added_by_content_[t.content] =
            static_cast<int32_t>(added_tokens_.size());
        added_tokens_.push_back(std::move(t));
      }
    }
    vocab_size_ = static_cast<int32_t>(max_id + 1);
    id_to_token_.assign(vocab_size_, std::string());
    for (const auto& [token, id] : vocab_) id_to_token_[id] = token;
    is_special_.assign(vocab_size_, false);
    for (const AddedToken& t : added_tokens_) {
      if (t.special) is_special_[t.id] = true;
    }

    // ---- Normalizer.
    section = "normalizer";
    std::function<absl::Status(const json&)> parse_norm =
        [&](const json& n) -> absl::Status {
      const std::string type = TypeOf(n);
      if (type == "Sequence") {
        if (!n.contains("normalizers") || !n["normalizers"].is_array()) {
          return Invalid("normalizer Sequence without \"normalizers\"");
        }
        for (const json& c : n["normalizers"]) {
          absl::Status s = parse_norm(c);
          if (!s.ok()) return s;
        }
      } else if (type == "Prepend") {
        normalizer_.push_back(
            {NormStep::kPrepend, GetString(n, "prepend"), ""});
      } else if (type == "Replace") {
        absl::StatusOr<std::string> pat =
            StringPattern(n, "normalizer Replace");
        if (!pat.ok()) return pat.status();
        normalizer_.push_back(
            {NormStep::kReplace, *pat, GetString(n, "content")});
      } else if (type == "NFC") {
        normalizer_.push_back({NormStep::kNfc, "", ""});
      } else {
        return Invalid(
            absl::StrCat("unsupported normalizer type '", type, "'"));
      }
      return absl::OkStatus();
    };
    if (root.contains("normalizer") && !root["normalizer"].is_null()) {
      absl::Status s = parse_norm(root["normalizer"]);
      if (!s.ok()) return s;
    }

    // ---- Pre-tokenizer.
    section = "pre_tokenizer";
    std::function<absl::Status(const json&)> parse_pre =
        [&](const json& p) -> absl::Status {
      const std::string type = TypeOf(p);
      if (type == "Sequence") {
        if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) {
          return Invalid("pre_tokenizer Sequence without \"pretokenizers\"");
        }
        for (const json& c : p["pretokenizers"]) {
          absl::Status s = parse_pre(c);
          if (!s.ok()) return s;
        }
        return absl::OkStatus();
      }
      if (type == "ByteLevel") {
        PreTokStep step;
        step.kind = PreTokStep::kByteLevel;
        step.add_prefix_space = GetBool(p, "add_prefix_space", false);
        step.use_regex = GetBool(p, "use_regex", true);
        pre_tokenizer_.push_back(step);
        return absl::OkStatus();
      }
      if (type == "Split") {
        PreTokStep step;
        step.kind = PreTokStep::kSplit;
        const std::string behavior = GetString(p, "behavior");
        if (behavior != "Isolated" || GetBool(p, "invert", false)) {
          return Invalid(absl::StrCat(
              "unsupported Split pre_tokenizer behavior '", behavior,
              "' (only Isolated, not inverted, is supported)"));
        }
        if (!p.contains("pattern") || !p["pattern"].is_object() ||
            !p["pattern"].contains("Regex")) {
          return Invalid(absl::StrCat(
              "unsupported Split pre_tokenizer pattern ",
              p.contains("pattern") ? p["pattern"].dump() : "(missing)",
              " (only the GPT-2, Qwen and Llama-3 regexes are supported)"));
        }
        const std::string re = p["pattern"]["Regex"].get<std::string>();
        if (re == kGpt2Pattern) {
          step.regex = SplitRegex::kGpt2;
        } else if (re == kQwenPattern) {
          step.regex = SplitRegex::kQwen;
        } else if (re == kLlama3Pattern) {
          step.regex = SplitRegex::kLlama3;
        } else {
          return Invalid(absl::StrCat(
              "unsupported Split pre_tokenizer regex '", re,
              "' (only the GPT-2, Qwen and Llama-3 regexes are supported)"));
        }
        pre_tokenizer_.push_back(step);
        return absl::OkStatus();
      }
      return Invalid(
          absl::StrCat("unsupported pre_tokenizer type '", type, "'"));
    };
    if (root.contains("pre_tokenizer") && !root["pre_tokenizer"].is_null()) {
      absl::Status s = parse_pre(root["pre_tokenizer"]);
      if (!s.ok()) return s;
    }

    // ---- Post-processor.
    section = "post_processor";
    std::function<absl::Status(const json&)> parse_post =
        [&](const json& p) -> absl::Status {
      const std::string type = TypeOf(p);
      if (type == "Sequence") {
        if (!p.contains("processors") || !p["processors"].is_array()) {
          return Invalid("post_processor Sequence without \"processors\"");
        }
        for (const json& c : p["processors"]) {
          absl::Status s = parse_post(c);
          if (!s.ok()) return s;
        }
        return absl::OkStatus();
      }
      if (type == "ByteLevel") return absl::OkStatus();  // Offsets only.
      std::vector<int32_t> pre, post;
      if (type == "TemplateProcessing") {
        if (!p.contains("single") || !p["single"].is_array()) {
          return Invalid("TemplateProcessing without a \"single\" list");
        }
        bool seen_a = false;
        for (const json& piece : p["single"]) {
          if (piece.contains("Sequence")) {
            seen_a = true;
            continue;
          }
          if (!piece.contains("SpecialToken")) {
            return Invalid(
                absl::StrCat("TemplateProcessing: bad piece ", piece.dump()));
          }
          const std::string name =
              piece.at("SpecialToken").at("id").get<std::string>();
          if (!p.contains("special_tokens") ||
              !p["special_tokens"].contains(name)) {
            return Invalid(absl::StrCat("TemplateProcessing: special token '",
                                        name, "' is not in special_tokens"));
          }
          for (const json& id : p.at("special_tokens").at(name).at("ids")) {
            (seen_a ? post : pre).push_back(id.get<int32_t>());
          }
        }
      } else if (type == "RobertaProcessing" || type == "BertProcessing") {
        pre.push_back(p.at("cls").at(1).get<int32_t>());
        post.push_back(p.at("sep").at(1).get<int32_t>());
      } else {
        return Invalid(
            absl::StrCat("unsupported post_processor type '", type, "'"));
      }
      pre.insert(pre.end(), prefix_ids_.begin(), prefix_ids_.end());
      prefix_ids_ = std::move(pre);
      suffix_ids_.insert(suffix_ids_.end(), post.begin(), post.end());
      return absl::OkStatus();
    };
    if (root.contains("post_processor") && !root["post_processor"].is_null()) {
      absl::Status s = parse_post(root["post_processor"]);
      if (!s.ok()) return s;
    }

    // ---- Decoder.
    section = "decoder";
    std::function<absl::Status(const json&)> parse_dec =
        [&](const json& d) -> absl::Status {
      const std::string type = TypeOf(d);
      DecodeStep step;
      if (type == "Sequence") {
        if (!d.contains("decoders") || !d["decoders"].is_array()) {
          return Invalid("decoder Sequence without \"decoders\"");
        }
        for (const json& c : d["decoders"]) {
          absl::Status s = parse_dec(c);
          if (!s.ok()) return s;
        }
        return absl::OkStatus();
      } else if (type == "ByteLevel") {
        step.kind = DecodeStep::kByteLevel;
      } else if (type == "Replace") {
        absl::StatusOr<std::string> pat = StringPattern(d, "decoder Replace");
        if (!pat.ok()) return pat.status();
        step.kind = DecodeStep::kReplace;
        step.a = *pat;
        step.b = GetString(d, "content");
      } else if (type == "ByteFallback") {
        step.kind = DecodeStep::kByteFallback;
      } else if (type == "Fuse") {
        step.kind = DecodeStep::kFuse;
      } else if (type == "Strip") {
        step.kind = DecodeStep::kStrip;
        const std::string content = GetString(d, "content");
        size_t len;
        if (content.empty() || DecodeUtf8(content, 0, &len) == kInvalidCp ||
            len != content.size()) {
          return Invalid("decoder Strip: content must be one character");
        }
        step.strip_char = DecodeUtf8(content, 0, &len);
        step.strip_start = d.value("start", 0);
        step.strip_stop = d.value("stop", 0);
      } else {
        return Invalid(absl::StrCat("unsupported decoder type '", type, "'"));
      }
      decoder_.push_back(std::move(step));
      return absl::OkStatus();
    };
    if (root.contains("decoder") && !root["decoder"].is_null()) {
      has_decoder_ = true;
      absl::Status s = parse_dec(root["decoder"]);
      if (!s.ok()) return s;
    }
  } catch (const json::exception& e) {
    return Invalid(absl::StrCat("malformed \"", section, "\": ", e.what()));
  }

  // ---- Added tokens: their strings by id, and the matchers.
  // As in `tokenizers`, a normalized added token's id maps back to its
  // normalized content (what Decode and IdToToken give).
  for (const AddedToken& t : added_tokens_) {
    id_to_token_[t.id] = t.normalized ? Normalize(t.content) : t.content;
  }
  // `tokenizers` skips, when asked to, every token whose string is the
  // content of a special added token.
  skip_on_decode_.assign(vocab_size_, false);
  for (int32_t id = 0; id < vocab_size_; ++id) {
    auto it = added_by_content_.find(id_to_token_[id]);
    if (it != added_by_content_.end() && added_tokens_[it->second].special) {
      skip_on_decode_[id] = true;
    }
  }
  for (int32_t i = 0; i < static_cast<int32_t>(added_tokens_.size()); ++i) {
    const AddedToken& t = added_tokens_[i];
    if (t.content.empty()) continue;
    AddedMatcher& m = t.normalized ? normalized_matcher_ : raw_matcher_;
    m.patterns.push_back(t.normalized ? Normalize(t.content) : t.content);
    m.token_index.push_back(i);
  }
  for (AddedMatcher* m : {&raw_matcher_, &normalized_matcher_}) {
    m->by_first_byte.assign(256, {});
    for (int32_t k = 0; k < static_cast<int32_t>(m->patterns.size()); ++k) {
      if (m->patterns[k].empty()) continue;
      m->by_first_byte[static_cast<uint8_t>(m->patterns[k][0])].push_back(k);
    }
    for (auto& bucket : m->by_first_byte) {
      std::stable_sort(bucket.begin(), bucket.end(), [m](int32_t x, int32_t y) {
        return m->patterns[x].size() > m->patterns[y].size();
      });
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Encoding.

namespace {

bool IsWordChar(uint32_t cp) {
  if (cp == '_') return true;
  const uint8_t c = Classify(cp);
  return c == kLetter || c == kNumber;
}

// Byte offset of the last character of s (s non-empty).
size_t LastCharStart(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80 &&
         s.size() - i < 4) {
    --i;
  }
  return i;
}

}  // namespace

std::vector<Tokenizer::Segment> Tokenizer::FindAddedTokens(
    std::string_view text, const AddedMatcher& m) const {
  std::vector<Segment> out;
  size_t start_offset = 0;
  size_t i = 0;
  while (i < text.size()) {
    const auto& bucket = m.by_first_byte[static_cast<uint8_t>(text[i])];
    int32_t hit = -1;
    for (int32_t k : bucket) {
      const std::string& pat = m.patterns[k];
      if (text.compare(i, pat.size(), pat) == 0) {
        hit = k;
        break;
      }
    }
    if (hit < 0) {
      ++i;
      continue;
    }
    const AddedToken& tok = added_tokens_[m.token_index[hit]];
    size_t start = i;
    size_t stop = i + m.patterns[hit].size();
    if (tok.single_word) {
      bool start_ok = true, stop_ok = true;
      if (start > 0) {
        size_t len;
        const size_t cs = LastCharStart(text.substr(0, start));
        start_ok = !IsWordChar(DecodeUtf8(text, cs, &len));
      }
      if (stop < text.size()) {
        size_t len;
        stop_ok = !IsWordChar(DecodeUtf8(text, stop, &len));
      }
      if (!start_ok || !stop_ok) {
        i = stop;  // Discarded; like `tokenizers`, search on after the match.
        continue;
      }
    }
    if (tok.lstrip) {
      size_t s = start;
      while (s > start_offset) {
        const size_t cs = LastCharStart(text.substr(0, s));
        size_t len;
        if (Classify(DecodeUtf8(text, cs, &len)) != kSpace) break;
        s = cs;
      }
      start = s;
    }
    const size_t match_end = stop;
    if (tok.rstrip) {
      while (stop < text.size()) {
        size_t len;
        if (Classify(DecodeUtf8(text, stop, &len)) != kSpace) break;
        stop += len;
      }
    }
    if (start_offset < start) {
      out.push_back({false, -1, start_offset, start});
    }
    out.push_back({true, tok.id, start, stop});
    start_offset = stop;
    i = std::max(match_end, stop);
  }
  if (start_offset < text.size()) {
    out.push_back({false, -1, start_offset, text.size()});
  }
  return out;
}

std::string Tokenizer::Normalize(std::string_view text) const {
  std::string s(text);
  for (const NormStep& step : normalizer_) {
    switch (step.kind) {
      case NormStep::kPrepend:
        if (!s.empty()) s.insert(0, step.a);
        break;
      case NormStep::kReplace: {
        std::string r;
        r.reserve(s.size());
        ReplaceAll(s, step.a, step.b, &r);
        s = std::move(r);
        break;
      }
      case NormStep::kNfc:
        s = Nfc(s);
        break;
    }
  }
  return s;
}

std::vector<std::string> Tokenizer::PreTokenize(std::string_view text) const {
  std::vector<std::string> pieces;
  pieces.emplace_back(text);
  const auto regex_split = [](SplitRegex kind, std::string_view s,
                              std::vector<std::string>* out) {
    const std::vector<Ch> c = DecodeChars(s);
    const size_t n = c.size() - 1;
    size_t i = 0;
    while (i < n) {
      size_t e;
      switch (kind) {
        case SplitRegex::kGpt2:
          e = MatchGpt2(c, n, i);
          break;
        case SplitRegex::kQwen:
          e = MatchQwen(c, n, i, 1);
          break;
        case SplitRegex::kLlama3:
        default:
          e = MatchQwen(c, n, i, 3);
          break;
      }
      if (e <= i) e = i + 1;
      out->emplace_back(s.substr(c[i].off, c[e].off - c[i].off));
      i = e;
    }
  };
  for (const PreTokStep& step : pre_tokenizer_) {
    std::vector<std::string> next;
    next.reserve(pieces.size());
    for (std::string& piece : pieces) {
      if (piece.empty()) continue;
      if (step.kind == PreTokStep::kSplit) {
        regex_split(step.regex, piece, &next);
        continue;
      }
      // ByteLevel.
      if (step.add_prefix_space && piece[0] != ' ') piece.insert(0, " ");
      if (step.use_regex) {
        const size_t first = next.size();
        regex_split(SplitRegex::kGpt2, piece, &next);
        for (size_t k = first; k < next.size(); ++k) {
          next[k] = ByteLevelEncode(next[k]);
        }
      } else {
        next.push_back(ByteLevelEncode(piece));
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

void Tokenizer::BpeWord(std::string_view w, std::vector<int32_t>* out) const {
  if (w.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(AV(w));
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  struct Sym {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Sym> syms;
  syms.reserve(w.size());
  const auto add = [&syms](int32_t id) {
    const int32_t k = static_cast<int32_t>(syms.size());
    syms.push_back({id, k - 1, k + 1, true});
  };
  // Split into characters, as `tokenizers`' BPE::merge_word does.
  bool pending_unk = false;
  std::string buf;
  size_t i = 0;
  while (i < w.size()) {
    size_t len;
    DecodeUtf8(w, i, &len);
    std::string_view key = w.substr(i, len);
    const bool first = i == 0;
    const bool last = i + len == w.size();
    if ((!first && !continuing_subword_prefix_.empty()) ||
        (last && !end_of_word_suffix_.empty())) {
      buf.clear();
      if (!first) buf += continuing_subword_prefix_;
      buf.append(key);
      if (last) buf += end_of_word_suffix_;
      key = buf;
    }
    i += len;
    auto it = vocab_.find(AV(key));
    if (it != vocab_.end()) {
      if (pending_unk) {
        add(unk_id_);
        pending_unk = false;
      }
      add(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char b : key)
        all = all && byte_token_ids_[static_cast<uint8_t>(b)] >= 0;
      if (all) {
        // (Like `tokenizers`, a pending unk is not flushed first.)
        for (char b : key) add(byte_token_ids_[static_cast<uint8_t>(b)]);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk && !fuse_unk_) add(unk_id_);
      pending_unk = true;
    }
  }
  if (pending_unk) add(unk_id_);
  if (syms.empty()) return;
  syms.back().next = -1;

  // Merge the lowest-ranked pair first (ties: leftmost), as `tokenizers`'
  // Word::merge_all does, including its stale-entry check.
  struct Cand {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator<(const Cand& o) const {  // Max-heap order reversed.
      if (rank != o.rank) return rank > o.rank;
      return pos > o.pos;
    }
  };
  const auto lookup = [this](int32_t a,
                             int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges_.find((static_cast<uint64_t>(a) << 32) |
                           static_cast<uint32_t>(b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  std::vector<Cand> heap_storage;
  heap_storage.reserve(syms.size());
  std::priority_queue<Cand> queue(std::less<Cand>(), std::move(heap_storage));
  for (size_t k = 0; k + 1 < syms.size(); ++k) {
    if (const auto* m = lookup(syms[k].id, syms[k + 1].id)) {
      queue.push({m->first, static_cast<int32_t>(k), m->second});
    }
  }
  while (!queue.empty()) {
    const Cand top = queue.top();
    queue.pop();
    Sym& cur = syms[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const int32_t next_pos = cur.next;
    const Sym right = syms[next_pos];
    const auto* m = lookup(cur.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;  // Stale.
    cur.id = top.new_id;
    cur.next = right.next;
    syms[next_pos].alive = false;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const auto* pm = lookup(syms[cur.prev].id, cur.id)) {
        queue.push({pm->first, cur.prev, pm->second});
      }
    }
    if (cur.next >= 0) {
      if (const auto* nm = lookup(cur.id, syms[cur.next].id)) {
        queue.push({nm->first, top.pos, nm->second});
      }
    }
  }
  for (const Sym& s : syms) {
    if (s.alive) out->push_back(s.id);
  }
}

void Tokenizer::EncodeSegment(std::string_view text, WordCache* cache,
                              std::vector<int32_t>* out) const {
  const auto encode_plain = [&](std::string_view s) {
    for (const std::string& word : PreTokenize(s)) {
      if (word.size() > 256) {  // Long words: not worth caching.
        BpeWord(word, out);
        continue;
      }
      auto it = cache->find(word);
      if (it == cache->end()) {
        std::vector<int32_t> ids;
        BpeWord(word, &ids);
        it = cache->emplace(word, std::move(ids)).first;
      }
      out->insert(out->end(), it->second.begin(), it->second.end());
    }
  };
  const std::string normalized = Normalize(text);
  if (normalized_matcher_.patterns.empty()) {
    encode_plain(normalized);
    return;
  }
  for (const Segment& seg : FindAddedTokens(normalized, normalized_matcher_)) {
    if (seg.is_token) {
      out->push_back(seg.id);
    } else {
      encode_plain(
          std::string_view(normalized).substr(seg.begin, seg.end - seg.begin));
    }
  }
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text,
                                       bool add_special_tokens) const {
  std::vector<int32_t> out;
  if (add_special_tokens) out = prefix_ids_;
  WordCache cache;
  if (raw_matcher_.patterns.empty()) {
    EncodeSegment(text, &cache, &out);
  } else {
    for (const Segment& seg : FindAddedTokens(text, raw_matcher_)) {
      if (seg.is_token) {
        out.push_back(seg.id);
      } else {
        EncodeSegment(text.substr(seg.begin, seg.end - seg.begin), &cache,
                      &out);
      }
    }
  }
  if (add_special_tokens) {
    out.insert(out.end(), suffix_ids_.begin(), suffix_ids_.end());
  }
  return out;
}

// ---------------------------------------------------------------------------
// Decoding.

std::string Tokenizer::Decode(const std::vector<int32_t>& ids,
                              bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size_ || id_to_token_[id].empty()) continue;
    if (skip_special_tokens && skip_on_decode_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  if (!has_decoder_) {
    std::string out;
    for (size_t k = 0; k < tokens.size(); ++k) {
      if (k > 0) out += ' ';
      out += tokens[k];
    }
    return out;
  }
  for (const DecodeStep& step : decoder_) {
    switch (step.kind) {
      case DecodeStep::kByteLevel: {
        std::string bytes;
        for (const std::string& t : tokens) ByteLevelDecodeToken(t, &bytes);
        tokens.assign(1, Utf8Lossy(bytes));
        break;
      }
      case DecodeStep::kReplace:
        for (std::string& t : tokens) {
          if (t.find(step.a) == std::string::npos) continue;
          std::string r;
          ReplaceAll(t, step.a, step.b, &r);
          t = std::move(r);
        }
        break;
      case DecodeStep::kByteFallback: {
        std::vector<std::string> next;
        next.reserve(tokens.size());
        std::string pending;
        const auto flush = [&] {
          if (pending.empty()) return;
          if (IsValidUtf8(pending)) {
            next.push_back(pending);
          } else {
            for (size_t k = 0; k < pending.size(); ++k) {
              next.emplace_back(kReplacementChar);
            }
          }
          pending.clear();
        };
        for (std::string& t : tokens) {
          if (char byte; ByteFallbackByte(t, &byte)) {
            pending.push_back(byte);
            continue;
          }
          flush();
          next.push_back(std::move(t));
        }
        flush();
        tokens = std::move(next);
        break;
      }
      case DecodeStep::kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        tokens.assign(1, std::move(all));
        break;
      }
      case DecodeStep::kStrip:
        for (std::string& t : tokens) {
          const std::vector<Ch> c = DecodeChars(t);
          const size_t n = c.size() - 1;
          size_t begin = 0;
          while (begin < n && begin < static_cast<size_t>(step.strip_start) &&
                 c[begin].cp == step.strip_char) {
            ++begin;
          }
          size_t end = n;
          size_t stripped = 0;
          while (end > begin &&
                 stripped < static_cast<size_t>(step.strip_stop) &&
                 c[end - 1].cp == step.strip_char) {
            --end;
            ++stripped;
          }
          t = t.substr(c[begin].off, c[end].off - c[begin].off);
        }
        break;
    }
  }
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

// ---------------------------------------------------------------------------
// Vocabulary queries.

int32_t Tokenizer::vocab_size() const { return vocab_size_; }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  auto a = added_by_content_.find(AV(token));
  if (a != added_by_content_.end()) return added_tokens_[a->second].id;
  auto v = vocab_.find(AV(token));
  if (v != vocab_.end()) return v->second;
  return std::nullopt;
}

std::string Tokenizer::IdToToken(int32_t id) const {
  if (id < 0 || id >= vocab_size_) return "";
  return id_to_token_[id];
}

std::string Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size_ || id_to_token_[id].empty() || IsSpecial(id)) return "";
  std::string t = id_to_token_[id];
  if (!has_decoder_) return t;
  for (const DecodeStep& step : decoder_) {
    switch (step.kind) {
      case DecodeStep::kByteLevel: {
        std::string bytes;
        ByteLevelDecodeToken(t, &bytes);
        t = std::move(bytes);
        break;
      }
      case DecodeStep::kReplace:
        if (t.find(step.a) != std::string::npos) {
          std::string r;
          ReplaceAll(t, step.a, step.b, &r);
          t = std::move(r);
        }
        break;
      case DecodeStep::kByteFallback:
        if (char byte; ByteFallbackByte(t, &byte)) t = std::string(1, byte);
        break;
      case DecodeStep::kFuse:
      case DecodeStep::kStrip:
        break;
    }
  }
  return t;
}

std::vector<std::string> Tokenizer::AllTokenBytes() const {
  std::vector<std::string> bytes(static_cast<size_t>(vocab_size_));
  for (int32_t id = 0; id < vocab_size_; ++id) bytes[id] = TokenBytes(id);
  return bytes;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size_ && is_special_[id];
}

std::optional<int32_t> Tokenizer::bos_id() const {
  if (prefix_ids_.empty()) return std::nullopt;
  return prefix_ids_.front();
}

std::vector<int32_t> EncodeDocuments(const Tokenizer& tok, std::string_view text,
                                     std::string_view separator, int32_t end_id) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(separator, pos);
    const std::string_view doc =
        text.substr(pos, hit == std::string_view::npos ? std::string_view::npos : hit - pos);
    const std::vector<int32_t> d = tok.Encode(doc, /*add_special_tokens=*/false);
    ids.insert(ids.end(), d.begin(), d.end());
    ids.push_back(end_id);
    if (hit == std::string_view::npos) break;
    pos = hit + separator.size();
  }
  return ids;
}

}  // namespace moemesh
