// The ChatML prompt template (Qwen and many other chat models):
//   <|im_start|>{role}\n{content}<|im_end|>\n   for each message, then
//   <|im_start|>assistant\n                      for the model's reply.
#ifndef MOEMESH_ROUTER_CHAT_TEMPLATE_H_
#define MOEMESH_ROUTER_CHAT_TEMPLATE_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer.h"

namespace moemesh {

// Renders (role, content) messages in ChatML; with `add_generation_prompt`
// the assistant header that the model continues from is appended.
// InvalidArgument for an empty list or a role other than system, user,
// assistant or tool. Content is copied verbatim: text in it that spells a
// special token (e.g. "<|im_end|>") encodes as that token.
absl::StatusOr<std::string> RenderChatML(
    const std::vector<std::pair<std::string, std::string>>& messages,
    bool add_generation_prompt = true);

// Whether `tok` has the <|im_start|> and <|im_end|> tokens ChatML needs.
bool SupportsChatML(const Tokenizer& tok);

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_CHAT_TEMPLATE_H_
