// Linking this file (//engine/cuda:backend, alwayslink) makes --device=cuda[:N] available.
#include "engine/cuda/cuda_engine.h"

namespace {
const bool kRegistered = [] {
  moemesh::cuda::RegisterCudaBackend();
  return true;
}();
}  // namespace
