// The generalized Hilbert curve (gilbert2d construction, docs/semantics.md "Hilbert-ordered attention").
#pragma once

#include <cstdint>
#include <vector>

namespace dattn {

// Token indices t = row * width + column of a height × width grid in curve order, starting at
// (row 0, column 0). A bijection onto [0, height·width); the classic Hilbert curve on power-of-two squares.
std::vector<std::int64_t> hilbert_grid_order(std::int64_t height, std::int64_t width);

// The plain-sequence layout: N tokens row by row on a grid of width ceil(sqrt(N)) and
// ceil(N / width) rows, visited along the curve, empty cells skipped.
std::vector<std::int64_t> hilbert_sequence_order(std::int64_t length);

}  // namespace dattn
