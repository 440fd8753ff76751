#!/usr/bin/env bash
# Installs the Debian packages MoE Mesh builds and runs with. Idempotent: quick when they are
# all present; runs `apt-get update` only when something is missing.
set -euo pipefail

PACKAGES=(
  bazel-bootstrap          # Bazel 4.2.3
  bazel-rules-java         # @rules_java for Bazel's default toolchains
  g++
  libgrpc++-dev            # gRPC 1.51 C++
  protobuf-compiler-grpc   # grpc_cpp_plugin
  libprotobuf-dev
  protobuf-compiler        # protoc
  libabsl-dev              # Abseil 20220623
  libdnnl-dev              # oneDNN 2.6
  libopenmpi-dev           # OpenMPI 4.1
  openmpi-bin              # mpirun
  libgtest-dev
  libgmock-dev
  nlohmann-json3-dev       # JSON
  python3-grpcio           # scripts/client.py
  python3-protobuf
  python3-yaml             # tests/deploy_test.py reads the Kubernetes manifests
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup: done"
