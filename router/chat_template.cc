#include "router/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

constexpr char kImStart[] = "<|im_start|>";
constexpr char kImEnd[] = "<|im_end|>";

bool IsChatRole(const std::string& role) {
  return role == "system" || role == "user" || role == "assistant" ||
         role == "tool";
}

}  // namespace

absl::StatusOr<std::string> RenderChatML(
    const std::vector<std::pair<std::string, std::string>>& messages,
    bool add_generation_prompt) {
  if (messages.empty()) {
    return absl::InvalidArgumentError("chat request has no messages");
  }
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& [role, content] = messages[i];
    if (!IsChatRole(role)) {
      return absl::InvalidArgumentError(
          absl::StrCat("message ", i, " has role \"", role,
                       "\"; expected system, user, assistant or tool"));
    }
    absl::StrAppend(&out, kImStart, role, "\n", content, kImEnd, "\n");
  }
  if (add_generation_prompt) absl::StrAppend(&out, kImStart, "assistant\n");
  return out;
}

bool SupportsChatML(const Tokenizer& tok) {
  return tok.TokenToId(kImStart).has_value() &&
         tok.TokenToId(kImEnd).has_value();
}

}  // namespace moemesh
