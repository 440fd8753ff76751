#include "engine/json_schema.h"

#include <algorithm>
#include <bitset>
#include <cmath>
#include <optional>
#include <map>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

using Json = nlohmann::ordered_json;  // keeps the properties in the schema's order

const std::set<std::string>& Keywords() {
  static const std::set<std::string> k = {
      "type",     "properties", "required", "additionalProperties", "items", "minItems",
      "maxItems", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
      "exclusiveMaximum", "format", "enum",       "const",    "anyOf",   "oneOf",    "$ref",  "$defs",
      "definitions", "title",   "description", "default", "examples", "$schema", "$id",
      "$comment"};
  return k;
}

std::bitset<256> BytesOfKinds(uint8_t kinds) {
  std::bitset<256> b;
  if (kinds & JsonSchema::kObject) b.set('{');
  if (kinds & JsonSchema::kArray) b.set('[');
  if (kinds & JsonSchema::kString) b.set('"');
  if (kinds & (JsonSchema::kNumber | JsonSchema::kInteger)) {
    b.set('-');
    for (char d = '0'; d <= '9'; ++d) b.set(static_cast<uint8_t>(d));
  }
  if (kinds & JsonSchema::kBoolean) {
    b.set('t');
    b.set('f');
  }
  if (kinds & JsonSchema::kNull) b.set('n');
  return b;
}

}  // namespace

class JsonSchema::Compiler {
 public:
  Compiler(const Json& doc, JsonSchema* out) : doc_(doc), out_(out) {}

  absl::StatusOr<uint16_t> Index(const Json& j, const std::string& path) {
    absl::StatusOr<Node> n = Build(j, path);
    if (!n.ok()) return n.status();
    return Push(std::move(*n));
  }

  // The bytes a value of node n may start with; an error for a cycle of anyOf / $ref that reads
  // no byte.
  absl::StatusOr<std::bitset<256>> FirstBytes(uint16_t n, int depth = 0) const {
    if (depth > 64) {
      return absl::InvalidArgumentError(
          "json_schema: $ref / anyOf refer to each other without a value between them");
    }
    const Node& node = out_->nodes_[n];
    std::bitset<256> b = BytesOfKinds(node.kinds);
    for (const std::string& c : node.choices) b.set(static_cast<uint8_t>(c[0]));
    for (uint16_t a : node.alternatives) {
      absl::StatusOr<std::bitset<256>> sub = FirstBytes(a, depth + 1);
      if (!sub.ok()) return sub.status();
      b |= *sub;
    }
    return b;
  }

 private:
  static absl::Status Bad(const std::string& path, const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat("json_schema at ", path.empty() ? "/" : path, ": ", why));
  }

  absl::StatusOr<uint16_t> Push(Node n) {
    if (out_->nodes_.size() >= 60000) return Bad("/", "too many subschemas");
    out_->nodes_.push_back(std::move(n));
    return static_cast<uint16_t>(out_->nodes_.size() - 1);
  }

  // The node of a $ref (compiled once, so that recursive schemas end).
  absl::StatusOr<uint16_t> Ref(const std::string& ref, const std::string& path) {
    if (auto it = refs_.find(ref); it != refs_.end()) return it->second;
    const Json* target = nullptr;
    std::string name;
    if (ref == "#") {
      target = &doc_;
    } else {
      for (const char* prefix : {"#/$defs/", "#/definitions/"}) {
        const std::string p = prefix;
        if (ref.compare(0, p.size(), p) != 0) continue;
        name = ref.substr(p.size());
        const std::string defs = p.substr(2, p.size() - 3);
        auto d = doc_.find(defs);
        if (d != doc_.end() && d->is_object()) {
          if (auto t = d->find(name); t != d->end()) target = &*t;
        }
      }
      if (name.empty()) {
        return Bad(path, absl::StrCat("$ref '", ref,
                                      "' is not supported: '#', '#/$defs/NAME' or "
                                      "'#/definitions/NAME'"));
      }
    }
    if (target == nullptr) return Bad(path, absl::StrCat("$ref '", ref, "' names no definition"));
    absl::StatusOr<uint16_t> slot = Push(Node());
    if (!slot.ok()) return slot.status();
    refs_[ref] = *slot;
    absl::StatusOr<Node> n = Build(*target, ref.substr(1));
    if (!n.ok()) return n.status();
    out_->nodes_[*slot] = std::move(*n);
    return *slot;
  }

  // Nesting of subschemas (the recursion below), bounded so that a deep schema is an error, not
  // a stack overflow.
  static constexpr int kMaxNesting = 64;

  absl::StatusOr<Node> Build(const Json& j, const std::string& path) {
    if (nesting_ >= kMaxNesting) {
      return Bad(path, absl::StrCat("subschemas nest deeper than ", kMaxNesting, " levels"));
    }
    ++nesting_;
    absl::StatusOr<Node> n = BuildNested(j, path);
    --nesting_;
    return n;
  }

  absl::StatusOr<Node> BuildNested(const Json& j, const std::string& path) {
    Node n;
    if (j.is_boolean()) {
      if (!j.get<bool>()) return Bad(path, "the schema false (no value) is not supported");
      n.kinds = kAnyKind;
      return n;
    }
    if (!j.is_object()) return Bad(path, "a schema must be an object");
    for (const auto& [key, value] : j.items()) {
      if (!Keywords().count(key)) {
        return Bad(path, absl::StrCat(
                             "keyword '", key,
                             "' is not supported (supported: type, properties, required, "
                             "additionalProperties, items, minItems, maxItems, enum, const, "
                             "anyOf, oneOf, $ref, $defs and annotations)"));
      }
    }
    auto has = [&j](const char* k) { return j.contains(k); };
    const bool typed = has("type") || has("properties") || has("required") ||
                       has("additionalProperties") || has("items") || has("minItems") ||
                       has("maxItems") || has("minLength") || has("maxLength") ||
                       has("minimum") || has("maximum") || has("exclusiveMinimum") ||
                       has("exclusiveMaximum") || has("format");
    if (has("$ref")) {
      if (typed || has("enum") || has("const") || has("anyOf") || has("oneOf")) {
        return Bad(path, "$ref with other keywords beside it is not supported");
      }
      if (!j["$ref"].is_string()) return Bad(path, "$ref must be a string");
      absl::StatusOr<uint16_t> target = Ref(j["$ref"].get<std::string>(), path + "/$ref");
      if (!target.ok()) return target.status();
      n.alternatives = {*target};
      return n;
    }
    for (const char* alt : {"anyOf", "oneOf"}) {
      if (!has(alt)) continue;
      if (typed || has("enum") || has("const") || (has("anyOf") && has("oneOf"))) {
        return Bad(path, absl::StrCat(alt, " with other keywords beside it is not supported"));
      }
      const Json& list = j[alt];
      if (!list.is_array() || list.empty()) return Bad(path, absl::StrCat(alt, " must be a list"));
      for (size_t i = 0; i < list.size(); ++i) {
        absl::StatusOr<uint16_t> a = Index(list[i], absl::StrCat(path, "/", alt, "/", i));
        if (!a.ok()) return a.status();
        n.alternatives.push_back(*a);
      }
      return n;
    }
    if (has("enum") || has("const")) {
      if (has("enum") && has("const")) return Bad(path, "enum and const together");
      Json values = has("const") ? Json::array({j["const"]}) : j["enum"];
      if (!values.is_array() || values.empty()) return Bad(path, "enum must be a non-empty list");
      for (const Json& v : values) {
        std::string s = v.dump();
        if (std::find(n.choices.begin(), n.choices.end(), s) == n.choices.end()) {
          n.choices.push_back(std::move(s));
        }
      }
      if (n.choices.size() > kMaxChoices) {
        return Bad(path, absl::StrCat("enum has ", n.choices.size(), " values; at most ",
                                      kMaxChoices));
      }
      return n;
    }
    if (has("type")) {
      const Json& t = j["type"];
      std::vector<std::string> names;
      if (t.is_string()) {
        names.push_back(t.get<std::string>());
      } else if (t.is_array() && !t.empty()) {
        for (const Json& e : t) {
          if (!e.is_string()) return Bad(path, "type must be a name or a list of names");
          names.push_back(e.get<std::string>());
        }
      } else {
        return Bad(path, "type must be a name or a list of names");
      }
      static const std::map<std::string, uint8_t> kinds = {
          {"object", kObject},   {"array", kArray},     {"string", kString}, {"number", kNumber},
          {"integer", kInteger}, {"boolean", kBoolean}, {"null", kNull}};
      for (const std::string& name : names) {
        auto k = kinds.find(name);
        if (k == kinds.end()) {
          return Bad(path, absl::StrCat("unknown type '", name,
                                        "' (object, array, string, number, integer, boolean, "
                                        "null)"));
        }
        n.kinds |= k->second;
      }
      if (n.kinds & kNumber) n.kinds &= static_cast<uint8_t>(~kInteger);
    } else if (has("properties") || has("required") || has("additionalProperties")) {
      n.kinds = kObject;
    } else if (has("items") || has("minItems") || has("maxItems")) {
      n.kinds = kArray;
    } else if (has("minLength") || has("maxLength")) {
      n.kinds = kString;
    } else {
      n.kinds = kAnyKind;  // {} or annotations only
    }
    if (absl::Status st = Object(j, path, &n); !st.ok()) return st;
    if (absl::Status st = Array(j, path, &n); !st.ok()) return st;
    if (absl::Status st = Bounds(j, path, "minLength", "maxLength", &n.min_length, &n.max_length);
        !st.ok()) {
      return st;
    }
    if (absl::Status st = IntegerRange(j, path, &n); !st.ok()) return st;
    if (auto f = j.find("format"); f != j.end()) {
      static const std::map<std::string, std::pair<Node::Format, uint32_t>> formats = {
          {"uuid", {Node::kUuid, 36}}, {"date", {Node::kDate, 10}},
          {"date-time", {Node::kDateTime, 20}}};
      auto it = f->is_string() ? formats.find(f->get<std::string>()) : formats.end();
      if (it == formats.end() || n.kinds != kString) {
        return Bad(path, absl::StrCat("format ", f->dump(),
                                      " is not supported (\"uuid\", \"date\" or \"date-time\", "
                                      "on type string)"));
      }
      n.format = it->second.first;
      n.min_length = n.max_length = it->second.second;
    }
    return n;
  }

  // minimum / maximum (and their exclusive forms), on integers only, in the two shapes a byte
  // recognizer follows exactly: both bounds at most kMaxChoices values apart (the values become
  // an enum), or a lower bound of 0 or 1 alone (no minus sign; for 1 no leading 0 either).
  absl::Status IntegerRange(const Json& j, const std::string& path, Node* n) {
    std::optional<int64_t> lo, hi;
    for (const char* key : {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"}) {
      auto b = j.find(key);
      if (b == j.end()) continue;
      if (n->kinds != kInteger) {
        return Bad(path, absl::StrCat(key, " is supported on integers only (type integer)"));
      }
      if (!b->is_number()) return Bad(path, absl::StrCat(key, " must be a number"));
      const double v = b->get<double>();
      if (!(std::fabs(v) < 1e15)) return Bad(path, absl::StrCat(key, " is out of range"));
      const std::string k = key;
      if (k == "minimum") lo = static_cast<int64_t>(std::ceil(v));
      if (k == "exclusiveMinimum") lo = static_cast<int64_t>(std::floor(v)) + 1;
      if (k == "maximum") hi = static_cast<int64_t>(std::floor(v));
      if (k == "exclusiveMaximum") hi = static_cast<int64_t>(std::ceil(v)) - 1;
    }
    if (!lo && !hi) return absl::OkStatus();
    if (lo && hi) {
      if (*lo > *hi) return Bad(path, "no integer lies between minimum and maximum");
      if (*hi - *lo < kMaxChoices) {
        n->kinds = 0;
        for (int64_t v = *lo; v <= *hi; ++v) n->choices.push_back(std::to_string(v));
        return absl::OkStatus();
      }
    } else if (lo && (*lo == 0 || *lo == 1)) {
      n->int_floor = static_cast<int8_t>(*lo);
      return absl::OkStatus();
    }
    return Bad(path, absl::StrCat("integer bounds are supported as minimum and maximum at most ",
                                  kMaxChoices, " values apart, or minimum 0 or 1 alone"));
  }

  absl::Status Object(const Json& j, const std::string& path, Node* n) {
    if (auto ap = j.find("additionalProperties"); ap != j.end()) {
      if (ap->is_boolean()) {
        if (!ap->get<bool>()) n->free_object = false;  // no keys but the properties
      } else if (!j.contains("properties")) {  // a map: any keys, values of this schema
        absl::StatusOr<uint16_t> v = Index(*ap, path + "/additionalProperties");
        if (!v.ok()) return v.status();
        n->additional = *v;
      }
    }
    auto props = j.find("properties");
    if (props != j.end()) {
      if (!props->is_object()) return Bad(path, "properties must be an object");
      if (props->size() > kMaxChoices) {
        return Bad(path, absl::StrCat("an object has ", props->size(), " properties; at most ",
                                      kMaxChoices));
      }
      n->free_object = false;
      for (const auto& [name, sub] : props->items()) {
        n->keys.push_back(Json(name).dump());
        absl::StatusOr<uint16_t> v = Index(sub, absl::StrCat(path, "/properties/", name));
        if (!v.ok()) return v.status();
        n->values.push_back(*v);
      }
      n->required.assign(n->keys.size(), false);
    }
    if (auto req = j.find("required"); req != j.end()) {
      if (!req->is_array()) return Bad(path, "required must be a list of property names");
      for (const Json& r : *req) {
        if (!r.is_string()) return Bad(path, "required must be a list of property names");
        const std::string key = Json(r.get<std::string>()).dump();
        auto it = std::find(n->keys.begin(), n->keys.end(), key);
        if (it == n->keys.end()) {
          return Bad(path, absl::StrCat("required names '", r.get<std::string>(),
                                        "', which is not in properties"));
        }
        n->required[static_cast<size_t>(it - n->keys.begin())] = true;
      }
    }
    return absl::OkStatus();
  }

  absl::Status Array(const Json& j, const std::string& path, Node* n) {
    if (auto items = j.find("items"); items != j.end()) {
      if (items->is_array()) return Bad(path, "items as a list (tuples) is not supported");
      absl::StatusOr<uint16_t> v = Index(*items, path + "/items");
      if (!v.ok()) return v.status();
      n->items = *v;
    }
    if (absl::Status st = Bounds(j, path, "minItems", "maxItems", &n->min_items, &n->max_items);
        !st.ok()) {
      return st;
    }
    if (n->min_items > 65535) return Bad(path, "minItems above 65535 is not supported");
    return absl::OkStatus();
  }

  // A pair of bounds (integers >= 0, min <= max) into *lo, *hi when given.
  static absl::Status Bounds(const Json& j, const std::string& path, const char* min_key,
                             const char* max_key, uint32_t* lo, uint32_t* hi) {
    for (const char* key : {min_key, max_key}) {
      auto b = j.find(key);
      if (b == j.end()) continue;
      if (!b->is_number_integer() || b->get<int64_t>() < 0 || b->get<int64_t>() >= UINT32_MAX) {
        return Bad(path, absl::StrCat(key, " must be an integer >= 0"));
      }
      *(key == min_key ? lo : hi) = b->get<uint32_t>();
    }
    if (*lo > *hi) return Bad(path, absl::StrCat(min_key, " is more than ", max_key));
    return absl::OkStatus();
  }

  const Json& doc_;
  JsonSchema* out_;
  std::map<std::string, uint16_t> refs_;
  int nesting_ = 0;
};

absl::StatusOr<std::shared_ptr<const JsonSchema>> JsonSchema::Compile(std::string_view text) {
  Json doc = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError("json_schema is not JSON");
  auto schema = std::make_shared<JsonSchema>();
  Node any;
  any.kinds = kAnyKind;
  schema->nodes_.push_back(any);
  Compiler c(doc, schema.get());
  absl::StatusOr<uint16_t> root = c.Index(doc, "");
  if (!root.ok()) return root.status();
  schema->root_ = *root;
  for (size_t i = 0; i < schema->nodes_.size(); ++i) {
    const Node& n = schema->nodes_[i];
    std::bitset<256> seen;
    for (uint16_t a : n.alternatives) {
      absl::StatusOr<std::bitset<256>> b = c.FirstBytes(a);
      if (!b.ok()) return b.status();
      if ((seen & *b).any()) {
        return absl::InvalidArgumentError(
            "json_schema: anyOf / oneOf alternatives must be told apart by their first byte "
            "(say an object, a string and null; not two objects)");
      }
      seen |= *b;
    }
  }
  absl::StatusOr<std::bitset<256>> first = c.FirstBytes(schema->root_);
  if (!first.ok()) return first.status();
  std::bitset<256> brace;
  brace.set('{');
  if (*first != brace) return absl::InvalidArgumentError("json_schema: the root must be an object");
  return std::shared_ptr<const JsonSchema>(std::move(schema));
}

uint8_t JsonSchema::KindOf(uint8_t c) {
  switch (c) {
    case '{': return kObject;
    case '[': return kArray;
    case '"': return kString;
    case 't':
    case 'f': return kBoolean;
    case 'n': return kNull;
    default: return c == '-' || (c >= '0' && c <= '9') ? kNumber | kInteger : 0;
  }
}

bool JsonSchema::FormatByte(Node::Format f, uint32_t pos, uint8_t c, uint32_t* memo) {
  const bool digit = c >= '0' && c <= '9';
  const uint32_t d = digit ? c - '0' : 0;
  if (f == Node::kUuid) {
    if (pos == 8 || pos == 13 || pos == 18 || pos == 23) return c == '-';
    return pos < 36 && (digit || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'));
  }
  // memo: year (bits 0-13), month (14-17), day tens (18-19), hour tens (20-21).
  const uint32_t year = *memo & 0x3FFF, month = (*memo >> 14) & 0xF, day_tens = (*memo >> 18) & 3;
  auto in = [&](uint32_t lo, uint32_t hi) { return digit && d >= lo && d <= hi; };
  switch (pos) {
    case 0: case 1: case 2: case 3:
      if (!digit) return false;
      *memo = (*memo & ~0x3FFFu) | (year * 10 + d);
      return true;
    case 4: case 7: return c == '-';
    case 5:
      if (!in(0, 1)) return false;
      *memo |= (d * 10) << 14;
      return true;
    case 6:
      if (!(month == 0 ? in(1, 9) : in(0, 2))) return false;
      *memo += d << 14;
      return true;
    case 8:
      if (!in(0, month == 2 ? 2 : 3)) return false;
      *memo |= d << 18;
      return true;
    case 9: {
      const bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
      const bool long_month = month == 1 || month == 3 || month == 5 || month == 7 ||
                              month == 8 || month == 10 || month == 12;
      if (day_tens == 0) return in(1, 9);
      if (day_tens == 1) return in(0, 9);
      if (day_tens == 2) return month == 2 && !leap ? in(0, 8) : in(0, 9);
      return long_month ? in(0, 1) : in(0, 0);
    }
    default: break;
  }
  if (f != Node::kDateTime) return false;
  switch (pos) {
    case 10: return c == 'T';
    case 11:
      if (!in(0, 2)) return false;
      *memo |= d << 20;
      return true;
    case 12: return ((*memo >> 20) & 3) == 2 ? in(0, 3) : in(0, 9);
    case 13: case 16: return c == ':';
    case 14: case 17: return in(0, 5);
    case 15: case 18: return in(0, 9);
    case 19: return c == 'Z';
    default: return false;
  }
}

int JsonSchema::Select(uint16_t n, uint8_t c) const {
  const Node& node = nodes_[n];
  for (uint16_t a : node.alternatives) {
    const int s = Select(a, c);
    if (s >= 0) return s;
  }
  if (node.kinds & KindOf(c)) return n;
  for (const std::string& choice : node.choices) {
    if (static_cast<uint8_t>(choice[0]) == c) return n;
  }
  return -1;
}

}  // namespace moemesh
