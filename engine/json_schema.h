// Structured outputs (OpenAI's response_format {"type": "json_schema"}): a JSON Schema compiled
// to the nodes a JsonState follows byte by byte, so that the generated text is one JSON value the
// schema accepts.
//
// The subset (anything else is an INVALID_ARGUMENT naming the keyword):
//   type (a name or a list of names), properties, required, additionalProperties, items,
//   minItems, maxItems, minLength, maxLength, minimum / maximum / exclusiveMinimum /
//   exclusiveMaximum on integers (bounds at most 64 values apart, or a lower bound of 0 or 1
//   alone), format "uuid", "date" or "date-time" on strings, enum, const, anyOf / oneOf (alternatives that start with different
//   bytes: an object, a string, null, ...), $ref to "#", "#/$defs/NAME" or
//   "#/definitions/NAME" (recursion allowed), and the annotations title, description, default,
//   examples, $schema, $id, $comment.
// As OpenAI's strict mode: an object with properties is generated with its keys in the schema's
// order and no other keys (properties not in `required` may be left out); an object without
// properties is any JSON object (its values as additionalProperties says, when that is a
// schema: Dict[str, int]). The root must be an object. enum and const values are
// generated in their compact form (no whitespace inside).
#ifndef MOEMESH_ENGINE_JSON_SCHEMA_H_
#define MOEMESH_ENGINE_JSON_SCHEMA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moemesh {

class JsonSchema {
 public:
  // Kinds of values, as bits of Node::kinds.
  enum Kind : uint8_t {
    kObject = 1,
    kArray = 2,
    kString = 4,
    kNumber = 8,
    kInteger = 16,  // a number without a fraction or exponent
    kBoolean = 32,
    kNull = 64,
    kAnyKind = 127,
  };
  static constexpr int kMaxChoices = 64;     // enum values, properties per object
  static constexpr uint16_t kAny = 0;        // node 0: any JSON value
  struct Node {
    uint8_t kinds = 0;
    std::vector<std::string> choices;  // enum / const values, compact JSON
    // Objects: with free_object, any keys, each value of node `additional`; else these keys
    // (quoted, as they are written), in order, each with its value's node and whether it is
    // required.
    bool free_object = true;
    uint16_t additional = kAny;
    std::vector<std::string> keys;
    std::vector<uint16_t> values;
    std::vector<bool> required;
    // Integers: -1 any; 0 no minus sign (>= 0); 1 neither a minus sign nor a leading 0 (>= 1).
    int8_t int_floor = -1;
    // Strings: minLength / maxLength, in characters (code points; an escape is one).
    uint32_t min_length = 0, max_length = UINT32_MAX;
    // format: "uuid" (8-4-4-4-12 hex digits), "date" (YYYY-MM-DD, a real day: leap years
    // counted) or "date-time" (YYYY-MM-DDTHH:MM:SSZ, a real day and time, in UTC).
    enum Format : uint8_t { kNoFormat, kUuid, kDate, kDateTime };
    Format format = kNoFormat;
    // Arrays.
    uint16_t items = kAny;
    uint32_t min_items = 0, max_items = UINT32_MAX;
    // anyOf: the alternatives (each starts with different bytes); kinds and choices are empty.
    std::vector<uint16_t> alternatives;
  };

  // Compiles a schema (JSON text).
  static absl::StatusOr<std::shared_ptr<const JsonSchema>> Compile(std::string_view text);

  const Node& node(uint16_t i) const { return nodes_[i]; }
  uint16_t root() const { return root_; }
  // The node that reads a value starting with byte c where `n` is expected (n itself, or one of
  // its alternatives), or -1 when none can.
  int Select(uint16_t n, uint8_t c) const;
  // The kind a value starting with byte c has (kNumber | kInteger for a number), or 0.
  static uint8_t KindOf(uint8_t c);
  // Whether byte c may be character `pos` of a string of format `f`; `memo` carries what the
  // characters before it said (the date's year, month, ...), 0 at the start.
  static bool FormatByte(Node::Format f, uint32_t pos, uint8_t c, uint32_t* memo);

 private:
  class Compiler;
  std::vector<Node> nodes_;
  uint16_t root_ = kAny;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_JSON_SCHEMA_H_
