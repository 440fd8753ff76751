#!/usr/bin/env bash
# Runs tests/client_test.py (Python and C++ clients against a fake server) with Debian's python3,
# which has python3-grpcio and python3-protobuf. Bazel runs it from the runfiles root.
set -euo pipefail
export XDG_CACHE_HOME="${TEST_TMPDIR:-$(mktemp -d)}"
export MOEMESH_CLIENT_BIN="${MOEMESH_CLIENT_BIN:-tools/moemesh_client}"
exec /usr/bin/python3 tests/client_test.py
