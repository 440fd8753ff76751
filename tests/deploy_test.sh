#!/usr/bin/env bash
# Runs tests/deploy_test.py (deploy/kubernetes/moemesh.yaml checked against the binaries, then
# run as local processes) with Debian's python3, which has python3-yaml.
set -euo pipefail
export MOEMESH_BIN_DIR="${MOEMESH_BIN_DIR:-$PWD}"
exec /usr/bin/python3 tests/deploy_test.py
