#include "engine/cuda/cuda_check.h"

#include <cuda_runtime.h>

namespace moemesh {
namespace cuda {
namespace {

__global__ void SaxpyKernel(int n, float a, const float* x, float* y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

bool Check(cudaError_t e, const char* what, std::string* error) {
  if (e == cudaSuccess) return true;
  *error = std::string(what) + ": " + cudaGetErrorString(e);
  return false;
}

}  // namespace

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

std::string DeviceName(int ordinal) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, ordinal) != cudaSuccess) return "";
  return prop.name;
}

bool Saxpy(int n, float a, const float* x, float* y, std::string* error) {
  float* dx = nullptr;
  float* dy = nullptr;
  size_t bytes = static_cast<size_t>(n) * sizeof(float);
  bool ok = Check(cudaMalloc(&dx, bytes), "cudaMalloc", error) &&
            Check(cudaMalloc(&dy, bytes), "cudaMalloc", error) &&
            Check(cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice), "copy x", error) &&
            Check(cudaMemcpy(dy, y, bytes, cudaMemcpyHostToDevice), "copy y", error);
  if (ok) {
    SaxpyKernel<<<(n + 255) / 256, 256>>>(n, a, dx, dy);
    ok = Check(cudaGetLastError(), "launch", error) &&
         Check(cudaMemcpy(y, dy, bytes, cudaMemcpyDeviceToHost), "copy back", error);
  }
  cudaFree(dx);
  cudaFree(dy);
  return ok;
}

}  // namespace cuda
}  // namespace moemesh
