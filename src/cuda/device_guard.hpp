// Runs host code on the CUDA device that holds a pointer (q's), restoring the caller's current
// device afterwards: every entry point of the CUDA backend starts with one.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "dattn/error.hpp"

namespace dattn::cuda {

class DeviceGuard {
 public:
  explicit DeviceGuard(const void* pointer) {
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, pointer) != cudaSuccess ||
        (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)) {
      cudaGetLastError();
      throw Error("q is not CUDA device memory; expected tensors allocated on the CUDA device they name");
    }
    cudaGetDevice(&previous_);
    device_ = attributes.device;
    if (device_ != previous_ && cudaSetDevice(device_) != cudaSuccess)
      throw std::runtime_error("dattn: cannot switch to CUDA device " + std::to_string(device_));
  }
  ~DeviceGuard() {
    if (device_ != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int device() const { return device_; }

 private:
  int previous_ = 0, device_ = 0;
};

// The current device's multiprocessors (the launches size their grids and scratch by them).
inline int multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("dattn: cannot read the CUDA device's multiprocessor count");
  }
  return count;
}

}  // namespace dattn::cuda
