// Smallest proof of the CUDA build path: device discovery and one kernel.
#ifndef MOEMESH_ENGINE_CUDA_CUDA_CHECK_H_
#define MOEMESH_ENGINE_CUDA_CUDA_CHECK_H_

#include <string>

namespace moemesh {
namespace cuda {

// Number of CUDA devices visible; 0 when there is no GPU or no driver (never fails).
int DeviceCount();

// Name of device `ordinal` ("" when absent).
std::string DeviceName(int ordinal);

// y[i] = a * x[i] + y[i] on device 0, through device buffers. Returns false and fills `error`
// on any CUDA failure.
bool Saxpy(int n, float a, const float* x, float* y, std::string* error);

}  // namespace cuda
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_CUDA_CUDA_CHECK_H_
