// Tensor views (non-owning) and a small owning tensor for users without a framework.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace dattn {

enum class DType : std::uint8_t { float32, bfloat16, float16, float64, boolean, int64, int32 };
enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
};

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
std::string device_name(Device device);

// Scalar conversions for the 16-bit storage types. Round to nearest even on the way down.
inline float bfloat16_to_float(std::uint16_t bits) {
  std::uint32_t word = std::uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline std::uint16_t float_to_bfloat16(float value) {
  std::uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((word >> 16) | 0x40);  // NaN stays NaN
  word += 0x7fffu + ((word >> 16) & 1u);
  return std::uint16_t(word >> 16);
}

float float16_to_float(std::uint16_t bits);
std::uint16_t float_to_float16(float value);

inline constexpr int kMaxRank = 6;

// A strided view of memory it does not own. Strides count elements, not bytes.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  Device device{};
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};

  std::int64_t size(int dim) const { return shape[dim]; }
  std::int64_t stride(int dim) const { return strides[dim]; }
  std::int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_string() const;
  // The view with dimension `dim` fixed at `index` (one rank lower), e.g. q out of [B, N, 3, H, D].
  TensorView select(int dim, std::int64_t index) const;
  // The view of entries [start, start + length) along `dim` (same rank), e.g. a rank's rows of q.
  TensorView narrow(int dim, std::int64_t start, std::int64_t length) const;
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

std::array<std::int64_t, kMaxRank> contiguous_strides(const std::vector<std::int64_t>& shape);

// A view of `data` with the given shape; contiguous row-major strides unless `strides` is given.
TensorView make_view(void* data, DType dtype, const std::vector<std::int64_t>& shape,
                     const std::vector<std::int64_t>& strides = {}, Device device = {});

// An owning, contiguous, 64-byte-aligned host tensor.
class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(const std::vector<std::int64_t>& shape, DType dtype);
  static Tensor zeros(const std::vector<std::int64_t>& shape, DType dtype);

  const TensorView& view() const { return view_; }
  operator TensorView() const { return view_; }
  std::int64_t numel() const { return view_.numel(); }
  std::size_t nbytes() const { return std::size_t(numel()) * dtype_size(view_.dtype); }
  template <class T>
  T* data() const { return view_.ptr<T>(); }

 private:
  struct FreeAligned {
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, FreeAligned> storage_;
  TensorView view_;
};

}  // namespace dattn
