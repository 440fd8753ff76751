#!/usr/bin/env bash
# The main command: sets up, builds, and generates a completion with the embedded model
# (models/pydoc-moe-17m) through the engine's CLI.
#   scripts/demo.sh ["prompt text"]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"The for statement in Python"}

scripts/setup.sh >/dev/null
echo "building //tools:moemesh ..."
bazel build //tools:moemesh 2>&1 | grep -E "^(ERROR|FAILED)" || true
test -x bazel-bin/tools/moemesh || { echo "build failed: run 'bazel build //tools:moemesh'"; exit 1; }

echo "prompt: $PROMPT"
bazel-bin/tools/moemesh generate --model=models/pydoc-moe-17m --prompt="$PROMPT" \
  --max_new_tokens=40 --greedy
