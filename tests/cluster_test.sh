#!/usr/bin/env bash
# Runs tests/cluster_test.py (real processes of every service on 127.0.0.1) with Debian's python3,
# which has python3-grpcio and python3-protobuf. Bazel runs it from the runfiles root, where the
# binaries sit at router/router, tools/moemesh, ...
set -euo pipefail
export XDG_CACHE_HOME="${TEST_TMPDIR:-$(mktemp -d)}"
export MOEMESH_BIN_DIR="${MOEMESH_BIN_DIR:-$PWD}"
exec /usr/bin/python3 tests/cluster_test.py
