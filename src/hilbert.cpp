// The curve splits a rectangle, given by a corner and two axis vectors (the major axis a, along
// which it travels, and the minor axis b), into two or three sub-rectangles and recurses. Halving
// uses floor division, negatives included, so every grid shape is covered exactly once.
#include "dattn/hilbert.hpp"

#include <cmath>
#include <cstdlib>

#include "dattn/error.hpp"

namespace dattn {
namespace {

std::int64_t sign(std::int64_t x) { return (x > 0) - (x < 0); }
std::int64_t floor_half(std::int64_t x) { return x >= 0 ? x / 2 : -((-x + 1) / 2); }

struct CurveWriter {
  std::int64_t width;
  std::vector<std::int64_t>& order;
  void visit(std::int64_t x, std::int64_t y) { order.push_back(y * width + x); }

  void rectangle(std::int64_t x, std::int64_t y, std::int64_t ax, std::int64_t ay, std::int64_t bx, std::int64_t by) {
    const std::int64_t w = std::llabs(ax + ay), h = std::llabs(bx + by);
    const std::int64_t dax = sign(ax), day = sign(ay), dbx = sign(bx), dby = sign(by);
    if (h == 1) {  // one row along the major axis
      for (std::int64_t i = 0; i < w; ++i, x += dax, y += day) visit(x, y);
      return;
    }
    if (w == 1) {  // one column along the minor axis
      for (std::int64_t i = 0; i < h; ++i, x += dbx, y += dby) visit(x, y);
      return;
    }
    std::int64_t ax2 = floor_half(ax), ay2 = floor_half(ay), bx2 = floor_half(bx), by2 = floor_half(by);
    const std::int64_t w2 = std::llabs(ax2 + ay2), h2 = std::llabs(bx2 + by2);
    if (2 * w > 3 * h) {  // long rectangle: two halves along the major axis
      if (w2 % 2 != 0 && w > 2) ax2 += dax, ay2 += day;  // keep the halves' lengths even
      rectangle(x, y, ax2, ay2, bx, by);
      rectangle(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by);
      return;
    }
    if (h2 % 2 != 0 && h > 2) bx2 += dbx, by2 += dby;
    rectangle(x, y, bx2, by2, ax2, ay2);                          // up the minor axis
    rectangle(x + bx2, y + by2, ax, ay, bx - bx2, by - by2);      // across
    rectangle(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),  // and back down
              -bx2, -by2, -(ax - ax2), -(ay - ay2));
  }
};

}  // namespace

std::vector<std::int64_t> hilbert_grid_order(std::int64_t height, std::int64_t width) {
  if (height < 1 || width < 1)
    throw Error("grid shape (" + std::to_string(height) + ", " + std::to_string(width) +
                ") must have both sides >= 1");
  std::vector<std::int64_t> order;
  order.reserve(std::size_t(height * width));
  CurveWriter writer{width, order};
  if (width >= height)
    writer.rectangle(0, 0, width, 0, 0, height);
  else
    writer.rectangle(0, 0, 0, height, width, 0);
  return order;
}

std::vector<std::int64_t> hilbert_sequence_order(std::int64_t length) {
  if (length < 1) throw Error("sequence length " + std::to_string(length) + " must be >= 1");
  std::int64_t width = std::int64_t(std::sqrt(double(length)));
  while (width * width < length) ++width;
  while ((width - 1) * (width - 1) >= length) --width;
  const std::int64_t height = (length + width - 1) / width;
  std::vector<std::int64_t> order;
  order.reserve(std::size_t(length));
  for (std::int64_t t : hilbert_grid_order(height, width))
    if (t < length) order.push_back(t);
  return order;
}

}  // namespace dattn
