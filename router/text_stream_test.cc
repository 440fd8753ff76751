// Tests of TextStream and the ChatML template. Expected texts come from
// Tokenizer::Decode of whole id lists (verified against Hugging Face by
// engine/tokenizer_test), from models/pydoc-moe-17m/reference.json, or from
// the literal input texts; never from TextStream itself. Run from the
// repository root.
#include "router/text_stream.h"

#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "router/chat_template.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

constexpr char kPydocPath[] = "models/pydoc-moe-17m/tokenizer.json";
constexpr char kReferencePath[] = "models/pydoc-moe-17m/reference.json";
constexpr char kHeldoutPath[] = "models/pydoc-moe-17m/heldout.txt";
constexpr char kHeldoutIdsPath[] = "models/pydoc-moe-17m/heldout_ids.json";
constexpr char kSpPath[] =
    "testdata/oracle/tokenizer_sentencepiece/tokenizer.json";
constexpr char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD.

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path
                         << " (run the test from the repository root)";
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

const Tokenizer& Pydoc() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::FromFile(kPydocPath);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? t->release() : nullptr;
  }();
  return *tok;
}

const Tokenizer& SentencePiece() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::FromFile(kSpPath);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? t->release() : nullptr;
  }();
  return *tok;
}

// Strict UTF-8 (RFC 3629): no overlong forms, surrogates, values past
// U+10FFFF or truncated sequences.
bool IsValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      n = 0;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (i + n >= s.size() && n > 0) return false;
    for (size_t k = 1; k <= n; ++k) {
      const unsigned char d = s[i + k];
      if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) return false;
    }
    i += n + 1;
  }
  return true;
}

TEST(Utf8ValidatorTest, AcceptsAndRejects) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("a\xC3\xA9\xE2\x9C\x93\xF0\x9F\x99\x82"));
  EXPECT_FALSE(IsValidUtf8("\xC3"));              // Truncated.
  EXPECT_FALSE(IsValidUtf8("\xF0\x9F\x99"));      // Truncated.
  EXPECT_FALSE(IsValidUtf8("\x80"));              // Lone continuation.
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));          // Overlong.
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // Surrogate.
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // Past U+10FFFF.
}

std::vector<int32_t> Prefix(const std::vector<int32_t>& ids, size_t n) {
  return std::vector<int32_t>(ids.begin(), ids.begin() + n);
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

struct Streamed {
  std::vector<std::string> deltas;  // One per Push.
  std::string finish;
  std::string joined;  // Deltas and Finish.
};

// Pushes `ids` one at a time, then finishes; checks what holds for every
// stream: each delta is valid UTF-8, text() is the concatenation so far.
Streamed Stream(const Tokenizer& tok, const std::vector<int32_t>& ids,
                bool skip_special, std::vector<std::string> stop = {}) {
  Streamed out;
  TextStream ts(&tok, std::move(stop), skip_special);
  for (int32_t id : ids) {
    StreamDelta d = ts.Push(id);
    EXPECT_TRUE(IsValidUtf8(d.text)) << "invalid UTF-8 delta after id " << id;
    EXPECT_FALSE(d.stopped);
    out.deltas.push_back(d.text);
    out.joined += d.text;
    EXPECT_EQ(ts.text(), out.joined);
  }
  out.finish = ts.Finish();
  EXPECT_TRUE(IsValidUtf8(out.finish));
  out.joined += out.finish;
  EXPECT_EQ(ts.text(), out.joined);
  EXPECT_EQ(ts.Finish(), "");  // A second Finish adds nothing.
  return out;
}

const std::vector<std::string>& Texts() {
  static const auto* texts = new std::vector<std::string>{
      "héllo wörld ✓ 日本語 🙂",
      "日本語日本語 🙂🙂👍🏽 ñandú Ünïcödé ½ → ∞",
      "def fib(n):\n    if n < 2:\n        return n\n"
      "    return fib(n - 1) + fib(n - 2)  # ✓\n",
      "a  b   c\n\n\n\t\tx    \n  ",
      "   leading spaces and trailing   ",
      " one leading space",
      "x",
      "The License of the work, and you may copy it; \"quoted\" "
      "{'dict': [1, 2, 3]}",
      "Ελληνικά Русский עברית العربية हिन्दी 한국어 ไทย",
      "\xE2\x80\x8Bzero-width\xE2\x80\x8B and combining e\xCC\x81 é",
  };
  return *texts;
}

struct TokCase {
  const char* name;
  const Tokenizer* tok;
};

std::vector<TokCase> BothTokenizers() {
  return {{"pydoc", &Pydoc()}, {"sentencepiece", &SentencePiece()}};
}

TEST(TextStreamTest, JoinedDeltasEqualDecodeOfAllIds) {
  for (const TokCase& tc : BothTokenizers()) {
    for (const std::string& text : Texts()) {
      for (bool add_special : {false, true}) {
        std::vector<int32_t> ids = tc.tok->Encode(text, add_special);
        if (add_special) {
          // Special tokens inside and at the end of the stream as well.
          ids.insert(ids.begin() + ids.size() / 2, 2);
          ids.push_back(2);
          ids.insert(ids.begin(), 1);
        }
        for (bool skip : {true, false}) {
          SCOPED_TRACE(std::string(tc.name) + " text=\"" + text +
                       "\" add_special=" + std::to_string(add_special) +
                       " skip=" + std::to_string(skip));
          const std::string expected = tc.tok->Decode(ids, skip);
          const Streamed s = Stream(*tc.tok, ids, skip);
          EXPECT_EQ(s.joined, expected);
          // The input has no U+FFFD, so none may be sent: the stream must
          // wait for the remaining bytes of a character instead.
          // (Kept special tokens inserted amid a character's byte tokens do
          // make U+FFFDs.)
          if (skip || !add_special) {
            for (const std::string& d : s.deltas) {
              EXPECT_FALSE(Contains(d, kReplacement)) << d;
            }
          }
          if (!add_special) {
            EXPECT_EQ(expected, text);  // Round trip, first principles.
          }
        }
      }
    }
  }
}

TEST(TextStreamTest, EmitsTextAsSoonAsCharactersAreComplete) {
  // For each prefix of the ids whose decoded text is complete (no U+FFFD),
  // everything must already have been sent by Push; Finish adds nothing.
  for (const TokCase& tc : BothTokenizers()) {
    for (const std::string& text : Texts()) {
      const std::vector<int32_t> ids = tc.tok->Encode(text, false);
      TextStream ts(tc.tok, {});
      for (size_t k = 1; k <= ids.size(); ++k) {
        ts.Push(ids[k - 1]);
        const std::string want = tc.tok->Decode(Prefix(ids, k));
        if (!Contains(want, kReplacement)) {
          EXPECT_EQ(ts.text(), want) << tc.name << " " << text << " k=" << k;
        }
      }
    }
  }
}

TEST(TextStreamTest, TruncatedByteLevelStreamEqualsDecode) {
  // Byte-level decoding is prefix-stable, so even a stream cut inside a
  // character must come out exactly as Decode of the ids it got.
  const Tokenizer& tok = Pydoc();
  for (const std::string& text : Texts()) {
    const std::vector<int32_t> ids = tok.Encode(text, false);
    for (size_t k = 0; k <= ids.size(); ++k) {
      const std::vector<int32_t> prefix = Prefix(ids, k);
      EXPECT_EQ(Stream(tok, prefix, true).joined, tok.Decode(prefix))
          << text << " k=" << k;
    }
  }
}

TEST(TextStreamTest, TruncatedByteFallbackStream) {
  const Tokenizer& tok = SentencePiece();
  // A character cut after a non-byte token: Finish gives Decode's U+FFFDs
  // (one per byte for ByteFallback).
  const std::vector<int32_t> ids = tok.Encode("ab 日", false);
  ASSERT_GE(ids.size(), 3u);
  for (size_t cut = 1; cut <= 2; ++cut) {
    const std::vector<int32_t> prefix = Prefix(ids, ids.size() - cut);
    const std::string want = tok.Decode(prefix);
    ASSERT_TRUE(EndsWith(want, kReplacement)) << want;
    const Streamed s = Stream(tok, prefix, true);
    EXPECT_EQ(s.joined, want);
    EXPECT_TRUE(EndsWith(s.finish, kReplacement));
    for (const std::string& d : s.deltas) {
      EXPECT_FALSE(Contains(d, kReplacement));
    }
  }
  // Every cut of a text that uses byte fallback: the deltas never hold a
  // U+FFFD, the output is valid UTF-8, and a cut at a complete character is
  // exact. (Where a cut splits a character that follows other byte-fallback
  // characters, Decode turns the whole byte run into U+FFFDs; the stream has
  // sent the complete ones already and ends in U+FFFD instead.)
  for (const std::string& text : Texts()) {
    const std::vector<int32_t> all = tok.Encode(text, false);
    for (size_t k = 0; k <= all.size(); ++k) {
      const std::vector<int32_t> prefix = Prefix(all, k);
      const std::string want = tok.Decode(prefix);
      const Streamed s = Stream(tok, prefix, true);
      for (const std::string& d : s.deltas) {
        EXPECT_FALSE(Contains(d, kReplacement));
      }
      if (!Contains(want, kReplacement)) {
        EXPECT_EQ(s.joined, want) << text << " k=" << k;
        EXPECT_EQ(s.finish, "");
      } else {
        EXPECT_TRUE(EndsWith(s.joined, kReplacement)) << text << " k=" << k;
      }
    }
  }
}

TEST(TextStreamTest, GreedyReferenceOutputs) {
  const json ref = json::parse(ReadFile(kReferencePath));
  ASSERT_FALSE(ref["prompts"].empty());
  for (const json& p : ref["prompts"]) {
    const auto ids = p["greedy"].get<std::vector<int32_t>>();
    ASSERT_EQ(ids.size(), 40u);
    const Streamed s = Stream(Pydoc(), ids, true);
    EXPECT_EQ(s.joined, Pydoc().Decode(ids));
    EXPECT_EQ(s.joined, p["greedy_text"].get<std::string>());
  }
}

TEST(TextStreamTest, LongDocumentBothTokenizers) {
  const auto ids =
      json::parse(ReadFile(kHeldoutIdsPath)).get<std::vector<int32_t>>();
  ASSERT_GT(ids.size(), 10000u);
  EXPECT_EQ(Stream(Pydoc(), ids, true).joined, Pydoc().Decode(ids));
  EXPECT_EQ(Stream(Pydoc(), ids, false).joined, Pydoc().Decode(ids, false));

  const std::string text = ReadFile(kHeldoutPath).substr(0, 30000);
  const std::vector<int32_t> sp_ids = SentencePiece().Encode(text, true);
  EXPECT_EQ(Stream(SentencePiece(), sp_ids, true).joined,
            SentencePiece().Decode(sp_ids));
}

TEST(TextStreamTest, CostPerTokenDoesNotGrowWithLength) {
  // Decoding only a window of recent ids keeps a long stream linear: 135k
  // tokens take well under a second; decoding everything per token would
  // take minutes.
  const auto doc =
      json::parse(ReadFile(kHeldoutIdsPath)).get<std::vector<int32_t>>();
  std::vector<int32_t> ids;
  for (int k = 0; k < 4; ++k) ids.insert(ids.end(), doc.begin(), doc.end());
  const auto start = std::chrono::steady_clock::now();
  TextStream ts(&Pydoc(), {"a stop string that never occurs"});
  for (int32_t id : ids) ts.Push(id);
  ts.Finish();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  EXPECT_EQ(ts.text(), Pydoc().Decode(ids));
  EXPECT_LT(seconds, 30.0);
}

TEST(TextStreamTest, OutOfRangeIdsAndSpecialRuns) {
  // Decode ignores out-of-range ids; so must the stream. A long run of
  // skipped special tokens between byte pieces of one character must not
  // break it apart.
  for (const TokCase& tc : BothTokenizers()) {
    std::vector<int32_t> ids = tc.tok->Encode("x 🙂 y", false);
    std::vector<int32_t> noisy;
    for (int32_t id : ids) {
      noisy.push_back(id);
      for (int k = 0; k < 5; ++k) noisy.push_back(2);
      noisy.push_back(-1);
      noisy.push_back(tc.tok->vocab_size() + 7);
    }
    for (bool skip : {true, false}) {
      EXPECT_EQ(Stream(*tc.tok, noisy, skip).joined,
                tc.tok->Decode(noisy, skip))
          << tc.name << " skip=" << skip;
    }
  }
}

// ---------------------------------------------------------------------------
// Stop strings.

// The longest suffix of `text` that is a proper prefix of some stop string.
std::string ExpectedHeld(const std::string& text,
                         const std::vector<std::string>& stops) {
  for (size_t k = text.size(); k > 0; --k) {
    const std::string suffix = text.substr(text.size() - k);
    for (const std::string& s : stops) {
      if (s.size() > k && s.compare(0, k, suffix) == 0) return suffix;
    }
  }
  return "";
}

// Earliest occurrence of any non-empty stop string in `text`, or npos.
size_t FirstStop(const std::string& text,
                 const std::vector<std::string>& stops) {
  size_t pos = std::string::npos;
  for (const std::string& s : stops) {
    if (!s.empty()) pos = std::min(pos, text.find(s));
  }
  return pos;
}

struct StopResult {
  bool stopped = false;
  size_t stop_token = 0;  // Index of the token that completed the match.
  bool held_something = false;
  std::string joined;
};

// Streams `ids` with `stops` and checks, token by token, against the decoded
// text of the ids so far (D_k): generation stops at the first token whose
// D_k contains a stop string, with the text before its earliest occurrence;
// before that, text() is D_k minus exactly the longest suffix that is a
// proper prefix of a stop string (when D_k is complete).
StopResult StreamWithStops(const Tokenizer& tok,
                           const std::vector<int32_t>& ids,
                           const std::vector<std::string>& stops) {
  StopResult r;
  TextStream ts(&tok, stops);
  for (size_t k = 1; k <= ids.size(); ++k) {
    const StreamDelta d = ts.Push(ids[k - 1]);
    EXPECT_TRUE(IsValidUtf8(d.text));
    for (const std::string& s : stops) {
      if (!s.empty()) {
        EXPECT_FALSE(Contains(d.text, s)) << s;
      }
    }
    r.joined += d.text;
    EXPECT_EQ(ts.text(), r.joined);
    const std::string dk = tok.Decode(Prefix(ids, k));
    const size_t pos = FirstStop(dk, stops);
    if (pos != std::string::npos) {
      EXPECT_TRUE(d.stopped) << "k=" << k;
      EXPECT_TRUE(ts.stopped());
      EXPECT_EQ(r.joined, dk.substr(0, pos));
      r.stopped = true;
      r.stop_token = k - 1;
      break;
    }
    EXPECT_FALSE(d.stopped) << "k=" << k;
    if (!Contains(dk, kReplacement)) {
      const std::string held = ExpectedHeld(dk, stops);
      EXPECT_EQ(r.joined + held, dk) << "k=" << k;
      if (!held.empty()) r.held_something = true;
    }
  }
  if (r.stopped) {
    // Nothing more comes out once stopped.
    for (int32_t id : ids) {
      const StreamDelta d = ts.Push(id);
      EXPECT_EQ(d.text, "");
      EXPECT_TRUE(d.stopped);
    }
    EXPECT_EQ(ts.Finish(), "");
  } else {
    r.joined += ts.Finish();
    EXPECT_FALSE(ts.stopped());
  }
  EXPECT_EQ(ts.text(), r.joined);
  return r;
}

// Whether the first occurrence of `stop` in Decode(ids) spans several tokens:
// it is not yet complete one token before the match completes, and it starts
// before the text of that token.
bool SpansTokens(const Tokenizer& tok, const std::vector<int32_t>& ids,
                 const std::string& stop) {
  for (size_t k = 1; k <= ids.size(); ++k) {
    const std::string dk = tok.Decode(Prefix(ids, k));
    const size_t pos = dk.find(stop);
    if (pos == std::string::npos) continue;
    return pos < tok.Decode(Prefix(ids, k - 1)).size();
  }
  return false;
}

TEST(TextStreamStopTest, StopStringSpanningTokensIsCutExactly) {
  struct Case {
    const Tokenizer* tok;
    std::string text;
    std::string stop;
  };
  const std::vector<Case> cases = {
      {&Pydoc(), "def main():\n    return 42\n\nprint(main())", "rn 4"},
      {&Pydoc(), "The file is open. The end of the file.", "open. The e"},
      {&Pydoc(), "héllo wörld ✓ 日本語 🙂 done", "本語 🙂"},
      {&Pydoc(), "x = 1\n\n\ny = 2\n", "\n\n\ny"},
      {&SentencePiece(), "the License of the work and you", "e License o"},
      {&SentencePiece(), "héllo wörld ✓ 日本語 🙂 done", "日本"},
      {&SentencePiece(), "héllo wörld ✓ 日本語 🙂 done", "語 🙂 d"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text + " / stop \"" + c.stop + "\"");
    const std::vector<int32_t> ids = c.tok->Encode(c.text, false);
    ASSERT_EQ(c.tok->Decode(ids), c.text);
    ASSERT_TRUE(SpansTokens(*c.tok, ids, c.stop));
    const StopResult r = StreamWithStops(*c.tok, ids, {c.stop});
    EXPECT_TRUE(r.stopped);
    // From the literal text: everything before the stop string, nothing of
    // it or after it.
    EXPECT_EQ(r.joined, c.text.substr(0, c.text.find(c.stop)));
    EXPECT_TRUE(r.held_something);
    EXPECT_LT(r.stop_token, ids.size());
  }
}

// min_tokens: stop strings in the text of the tokens before the min_tokens-th pass through; the
// first match in text that arrives from then on ends the stream.
TEST(TextStreamStopTest, MinTokensDelaysStopStrings) {
  const Tokenizer& tok = Pydoc();
  const std::string text = "a = 1\nb = 2\nc = 3\n";
  const std::vector<int32_t> ids = tok.Encode(text, false);
  ASSERT_EQ(tok.Decode(ids), text);
  // Tokens up to and including the one that ends "b = 2\n".
  std::string seen;
  size_t second_line = 0;
  while (second_line < ids.size() && seen.find("2\n") == std::string::npos) {
    seen = tok.Decode(std::vector<int32_t>(ids.begin(), ids.begin() + ++second_line));
  }
  ASSERT_LT(second_line, ids.size());
  auto run = [&](int64_t min_tokens) {
    TextStream ts(&tok, {" = "}, true, min_tokens);
    std::string joined;
    for (int32_t id : ids) {
      const StreamDelta d = ts.Push(id);
      joined += d.text;
      if (d.stopped) return joined;
    }
    return joined + ts.Finish();
  };
  EXPECT_EQ(run(0), "a");
  EXPECT_EQ(run(1), "a");  // the first token's text is checked
  // Stop strings wait for the token after the second line: the third line's " = " stops it.
  EXPECT_EQ(run(static_cast<int64_t>(second_line) + 1), "a = 1\nb = 2\nc");
  EXPECT_EQ(run(static_cast<int64_t>(ids.size()) + 1), text);
}

TEST(TextStreamStopTest, StopWithinOneTokenAndAtStart) {
  const Tokenizer& tok = Pydoc();
  const std::string text = "The file is open";
  const std::vector<int32_t> ids = tok.Encode(text, false);
  ASSERT_EQ(tok.Decode(ids), text);
  // Inside one token (" file" is one token of this vocabulary).
  ASSERT_TRUE(tok.TokenToId(std::string("\xC4\xA0") + "file").has_value());
  StopResult r = StreamWithStops(tok, ids, {"il"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.joined, "The f");
  // At the very start.
  r = StreamWithStops(tok, ids, {"The"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.stop_token, 0u);
  EXPECT_EQ(r.joined, "");
  // Several stop strings: the first to complete ends the stream, cut at the
  // earliest occurrence.
  r = StreamWithStops(tok, ids, {"is open", "e f", "xyz"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.joined, "Th");
  // Two stop strings completed by the same token (" file"): the earlier
  // occurrence wins, whatever the order of the list.
  r = StreamWithStops(tok, ids, {"le", "fi"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.joined, "The ");
}

TEST(TextStreamStopTest, StopThatNeverMatchesLeavesFullDecode) {
  for (const TokCase& tc : BothTokenizers()) {
    for (const std::string& text : Texts()) {
      const std::vector<int32_t> ids = tc.tok->Encode(text, false);
      // Stop strings whose prefixes occur in the texts but never the whole.
      const std::vector<std::string> stops = {
          "zzz", "", "日本人", "🙂🙃", "  \n!", "def main", "e\xCC\x81t"};
      ASSERT_EQ(FirstStop(text, stops), std::string::npos);
      const StopResult r = StreamWithStops(*tc.tok, ids, stops);
      EXPECT_FALSE(r.stopped);
      EXPECT_EQ(r.joined, tc.tok->Decode(ids)) << tc.name << " " << text;
    }
  }
  // Only empty stop strings: ignored.
  const std::vector<int32_t> ids = Pydoc().Encode("abc", false);
  EXPECT_EQ(Stream(Pydoc(), ids, true, {"", ""}).joined, "abc");
}

TEST(TextStreamStopTest, HeldPartialMatchIsReleasedWhenItStopsMatching) {
  const Tokenizer& tok = Pydoc();
  const std::string text = "a fil b the fi and files";
  const std::vector<int32_t> ids = tok.Encode(text, false);
  ASSERT_EQ(tok.Decode(ids), text);
  // "file" is held while the text ends in "fil"/"fi"/"f" and let out once
  // the next token does not continue it; it matches at "files".
  TextStream ts(&tok, {"file"});
  bool saw_held_fil = false;
  bool released = false;
  for (size_t k = 1; k <= ids.size(); ++k) {
    const StreamDelta d = ts.Push(ids[k - 1]);
    const std::string dk = tok.Decode(Prefix(ids, k));
    if (d.stopped) {
      EXPECT_EQ(ts.text(), text.substr(0, text.find("file")));
      break;
    }
    if (EndsWith(dk, "a fil")) {
      EXPECT_EQ(ts.text(), "a ");
      saw_held_fil = true;
    } else if (saw_held_fil && !released) {
      EXPECT_TRUE(Contains(ts.text(), "a fil "));
      released = true;
    }
  }
  EXPECT_TRUE(saw_held_fil);
  EXPECT_TRUE(released);
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "a fil b the fi and ");

  // Same through the generic checker, on both tokenizers.
  for (const TokCase& tc : BothTokenizers()) {
    const std::vector<int32_t> sp = tc.tok->Encode(text, false);
    const StopResult r = StreamWithStops(*tc.tok, sp, {"file", "fix", "b x"});
    EXPECT_TRUE(r.held_something);
    EXPECT_TRUE(r.stopped);
    EXPECT_EQ(r.joined, "a fil b the fi and ");
  }
}

TEST(TextStreamStopTest, FinishReleasesHeldPartialMatch) {
  for (const TokCase& tc : BothTokenizers()) {
    const std::vector<int32_t> ids = tc.tok->Encode("hello wor", false);
    TextStream ts(tc.tok, {"world"});
    for (int32_t id : ids) EXPECT_FALSE(ts.Push(id).stopped);
    EXPECT_EQ(ts.text(), "hello ");
    EXPECT_EQ(ts.Finish(), "wor");
    EXPECT_EQ(ts.text(), "hello wor");
    EXPECT_FALSE(ts.stopped());
    // Nothing after Finish.
    EXPECT_EQ(ts.Push(ids[0]).text, "");
  }
}

TEST(TextStreamStopTest, SpecialTokensAreNotMatchedWhenSkipped) {
  const Tokenizer& tok = Pydoc();
  const std::vector<int32_t> ids = tok.Encode("ok<|im_end|>more", false);
  ASSERT_EQ(tok.Decode(ids, false), "ok<|im_end|>more");
  ASSERT_EQ(tok.Decode(ids, true), "okmore");
  // Skipped special tokens are not text: "<|im_end|>" cannot match...
  StopResult r = StreamWithStops(tok, ids, {"<|im_end|>"});
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(r.joined, "okmore");
  // ...but it can when they are kept.
  TextStream ts(&tok, {"<|im_end|>"}, /*skip_special=*/false);
  bool stopped = false;
  for (int32_t id : ids) stopped = ts.Push(id).stopped || stopped;
  EXPECT_TRUE(stopped);
  EXPECT_EQ(ts.text(), "ok");
}

// ---------------------------------------------------------------------------
// Chat template.

TEST(ChatTemplateTest, RendersChatML) {
  absl::StatusOr<std::string> s =
      RenderChatML({{"system", "You are a helpful assistant."},
                    {"user", "What does `zip` do?"}});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat does `zip` do?<|im_end|>\n"
            "<|im_start|>assistant\n");

  const std::vector<int32_t> ids = Pydoc().Encode(*s, false);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(Pydoc().IdToToken(1), "<|im_start|>");
  // Decoding with special tokens kept gives the prompt back.
  EXPECT_EQ(Pydoc().Decode(ids, false), *s);

  s = RenderChatML({{"user", "hi"}, {"assistant", "hello"}, {"tool", "{}"}},
                   /*add_generation_prompt=*/false);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s,
            "<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\nhello<|im_end|>\n"
            "<|im_start|>tool\n{}<|im_end|>\n");
}

TEST(ChatTemplateTest, RejectsBadInput) {
  absl::StatusOr<std::string> s = RenderChatML({});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  s = RenderChatML({{"user", "hi"}, {"robot", "beep"}});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("robot"), absl::string_view::npos);
  s = RenderChatML({{"", "x"}});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  s = RenderChatML({{"User", "x"}});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateTest, SupportsChatML) {
  EXPECT_TRUE(SupportsChatML(Pydoc()));
  EXPECT_FALSE(SupportsChatML(SentencePiece()));
}

}  // namespace
}  // namespace moemesh
