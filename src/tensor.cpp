#include "dattn/tensor.hpp"

#include <cstdlib>
#include <new>
#include <sstream>

#include "dattn/error.hpp"

namespace dattn {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float32: return 4;
    case DType::bfloat16: return 2;
    case DType::float16: return 2;
    case DType::float64: return 8;
    case DType::boolean: return 1;
    case DType::int64: return 8;
    case DType::int32: return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32: return "float32";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
    case DType::float64: return "float64";
    case DType::boolean: return "bool";
    case DType::int64: return "int64";
    case DType::int32: return "int32";
  }
  return "unknown";
}

std::string device_name(Device device) {
  return device.type == DeviceType::cpu ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

float float16_to_float(std::uint16_t bits) {
  const std::uint32_t sign = std::uint32_t(bits & 0x8000u) << 16;
  std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;
  std::uint32_t word;
  if (exponent == 0x1f) {
    word = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    word = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    word = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    word = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

std::uint16_t float_to_float16(float value) {
  std::uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const std::uint16_t sign = std::uint16_t((word >> 16) & 0x8000u);
  const std::uint32_t magnitude = word & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;       // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;      // rounds to inf
  if (magnitude >= 0x38800000u) {                           // normal half
    const std::uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return sign | std::uint16_t((rounded - 0x38000000u) >> 13);
  }
  if (magnitude < 0x33000000u) return sign;                 // below half the smallest subnormal
  // Subnormal half: shift the full mantissa into place with round to nearest even.
  const std::uint32_t exponent = magnitude >> 23;
  const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126 - exponent;  // 14..24
  std::uint32_t result = mantissa >> shift;
  const std::uint32_t remainder = mantissa & ((1u << shift) - 1);
  const std::uint32_t half = 1u << (shift - 1);
  if (remainder > half || (remainder == half && (result & 1u))) ++result;
  return sign | std::uint16_t(result);
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int d = 0; d < rank; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  std::int64_t expected = 1;
  for (int d = rank - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::ostringstream s;
  s << '[';
  for (int d = 0; d < rank; ++d) s << (d ? ", " : "") << shape[d];
  s << ']';
  return s.str();
}

TensorView TensorView::select(int dim, std::int64_t index) const {
  if (dim < 0 || dim >= rank) throw Error("select: dim " + std::to_string(dim) + " out of range for rank " + std::to_string(rank));
  if (index < 0 || index >= shape[dim])
    throw Error("select: index " + std::to_string(index) + " out of range [0, " + std::to_string(shape[dim]) + ")");
  TensorView out = *this;
  out.data = static_cast<std::byte*>(data) + index * strides[dim] * std::int64_t(dtype_size(dtype));
  for (int d = dim; d + 1 < rank; ++d) {
    out.shape[d] = shape[d + 1];
    out.strides[d] = strides[d + 1];
  }
  out.rank = rank - 1;
  out.shape[out.rank] = 0;
  out.strides[out.rank] = 0;
  return out;
}

TensorView TensorView::narrow(int dim, std::int64_t start, std::int64_t length) const {
  if (dim < 0 || dim >= rank) throw Error("narrow: dim " + std::to_string(dim) + " out of range for rank " + std::to_string(rank));
  if (start < 0 || length < 0 || start + length > shape[dim])
    throw Error("narrow: [" + std::to_string(start) + ", " + std::to_string(start + length) + ") out of range [0, " +
                std::to_string(shape[dim]) + "]");
  TensorView out = *this;
  out.data = static_cast<std::byte*>(data) + start * strides[dim] * std::int64_t(dtype_size(dtype));
  out.shape[dim] = length;
  return out;
}

std::array<std::int64_t, kMaxRank> contiguous_strides(const std::vector<std::int64_t>& shape) {
  std::array<std::int64_t, kMaxRank> strides{};
  std::int64_t stride = 1;
  for (int d = int(shape.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= shape[d];
  }
  return strides;
}

TensorView make_view(void* data, DType dtype, const std::vector<std::int64_t>& shape,
                     const std::vector<std::int64_t>& strides, Device device) {
  if (shape.size() > std::size_t(kMaxRank)) throw Error("make_view: rank " + std::to_string(shape.size()) + " exceeds " + std::to_string(kMaxRank));
  if (!strides.empty() && strides.size() != shape.size())
    throw Error("make_view: strides has " + std::to_string(strides.size()) + " entries, expected " + std::to_string(shape.size()));
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.device = device;
  view.rank = int(shape.size());
  const auto dense = contiguous_strides(shape);
  for (int d = 0; d < view.rank; ++d) {
    view.shape[d] = shape[d];
    view.strides[d] = strides.empty() ? dense[d] : strides[d];
  }
  return view;
}

void Tensor::FreeAligned::operator()(std::byte* p) const { std::free(p); }

Tensor Tensor::empty(const std::vector<std::int64_t>& shape, DType dtype) {
  for (auto extent : shape)
    if (extent < 0) throw Error("Tensor::empty: negative extent in shape");
  Tensor t;
  t.view_ = make_view(nullptr, dtype, shape);
  const std::size_t bytes = std::max<std::size_t>(64, (t.nbytes() + 63) / 64 * 64);
  auto* p = static_cast<std::byte*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  t.storage_.reset(p);
  t.view_.data = p;
  return t;
}

Tensor Tensor::zeros(const std::vector<std::int64_t>& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::memset(t.view_.data, 0, t.nbytes());
  return t;
}

}  // namespace dattn
