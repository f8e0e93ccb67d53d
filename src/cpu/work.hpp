// How a call's rows are cut into work items and groups. Shared by every ISA and by the
// forward, dq and dk/dv passes: a work item owns a region of rows of one (batch, head); a
// group is the part of that region one branch selects inside one of its segments, together
// with the full set of rows on the other side (keys for a query region, queries for a key
// region) that the group's rows meet.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "params.hpp"

namespace dattn::cpu {

inline constexpr std::int64_t kTileRows = 64;    // rows of one GEMM tile, on either side
inline constexpr std::int64_t kChunkRows = 256;  // a group's own rows packed at once (4 tiles)
inline constexpr std::int64_t kMaxLongnetStride = 8;  // caps a longnet region at 512 rows

struct WorkItem {
  std::int64_t batch = 0, head = 0;
  std::int64_t region_begin = 0, region_end = 0;  // original rows this item writes
  int branch = -1;                                // grouped: the head's branch; longnet: -1 (all)
  bool key_side = false;                          // block-sparse: the region is a key block
  // Rows of the per-thread state: state row s holds original row state_base + s*state_stride.
  std::int64_t state_base = 0, state_stride = 1, state_rows = 0;
  double cost = 0;
};

// The item's own rows j in [begin, end) sit at positions own_first + j·stride; the other side's
// rows j in [0, other_length) at other_first + j·stride. For dilated attention both sides are the
// rows a branch selects in one segment (own_first == other_first).
struct Group {
  int branch = 0;
  std::int64_t stride = 1;          // dilation rate
  std::int64_t own_first = 0;       // position of own row 0
  std::int64_t other_first = 0;     // position of other row 0
  std::int64_t other_length = 0;    // rows on the other side (L for dilated attention)
  std::int64_t begin = 0, end = 0;  // indices of the item's own rows in this group
};

// A range of positions of the (global) sequence.
struct RowRange {
  std::int64_t begin = 0, end = 0;
};
// The local query rows [query_position, query_position + seqlen) and the keys of this call
// [key_begin, key_end): both the whole sequence except in a ring step.
RowRange query_rows(const detail::DilatedParams& p);
RowRange key_rows(const detail::DilatedParams& p);
// The rows an item owns (keys in the dk/dv pass) and the rows on the other side.
RowRange own_rows(const detail::DilatedParams& p, bool key_side);
RowRange other_rows(const detail::DilatedParams& p, bool key_side);

// Rows a branch with this offset and stride selects in a segment of this length. Defined out of
// line (like make_work_items) so that no ISA-specific copy of it exists: every inline function in
// the kernel headers is a template over the ISA.
std::int64_t selected_count(std::int64_t segment_length, std::int64_t offset, std::int64_t stride);

// Calls fn(group) for every group of the item's region: per branch and segment for dilated
// attention, per allowed block of the other side for block-sparse attention.
template <class Fn>
void for_each_group(const detail::DilatedParams& p, const WorkItem& item, Fn&& fn) {
  if (p.block_size > 0) {
    const std::int64_t bs = p.block_size, block = item.region_begin / bs;
    const std::int64_t head = p.block_mask_heads == 1 ? 0 : item.head;
    const std::int64_t* offsets = item.key_side ? p.block_column_offsets : p.block_row_offsets;
    const std::int64_t* others = item.key_side ? p.block_rows : p.block_columns;
    const std::int64_t row = head * ((item.key_side ? p.key_blocks : p.query_blocks) + 1) + block;
    const RowRange other = other_rows(p, item.key_side);  // a ring step sees only its key (or query) range
    for (std::int64_t e = offsets[row]; e < offsets[row + 1]; ++e) {
      const std::int64_t other_first = std::max(others[e] * bs, other.begin);
      const std::int64_t other_end = std::min({others[e] * bs + bs, p.global_length, other.end});
      if (other_first < other_end)
        fn(Group{-1, 1, item.region_begin, other_first, other_end - other_first, 0, item.region_end - item.region_begin});
    }
    return;
  }
  for (int i = 0; i < p.num_branches; ++i) {
    if (item.branch >= 0 && i != item.branch) continue;
    const detail::Branch& br = p.branches[i];
    if (item.head < br.first_head || item.head >= br.first_head + br.head_count) continue;
    const std::int64_t w = br.segment_length, r = br.dilation_rate, o = br.offset_from_head ? item.head % r : br.group_offset;
    const RowRange other = other_rows(p, item.key_side);
    for (std::int64_t start = item.region_begin / w * w; start < item.region_end; start += w) {
      const std::int64_t length = selected_count(std::min(w, p.global_length - start), o, r);
      const std::int64_t first = start + o;
      // indices j with begin <= first + j*r < end, of the region and of the other side's rows
      const std::int64_t lo = std::max<std::int64_t>(0, (item.region_begin - first + r - 1) / r);
      const std::int64_t hi = std::min(length, (item.region_end - first + r - 1) / r);
      const std::int64_t other_lo = std::max<std::int64_t>(0, (other.begin - first + r - 1) / r);
      const std::int64_t other_hi = std::min(length, (other.end - first + r - 1) / r);
      if (lo < hi && other_lo < other_hi) fn(Group{i, r, first, first + other_lo * r, other_hi - other_lo, lo, hi});
    }
  }
}

// Work items over (batch, head, region), longest first so dynamic scheduling balances segments
// of different sizes. Grouped regions are one tile of one branch's selected rows of one segment
// (with the unselected rows around them); longnet regions are runs of consecutive rows.
// Block-sparse regions are one block each (key blocks for the dk/dv pass, key_side).
std::vector<WorkItem> make_work_items(const detail::DilatedParams& p, bool key_side = false);

// The one-pass backward's items: one whole segment of one head (grouped mode), longest first.
// It applies to whole-sequence grouped calls (no ring step, index map or block mask, both passes,
// no accumulation) whose every non-empty segment selects at least min_rows rows.
bool segment_backward_applies(const detail::DilatedParams& p, std::int64_t min_rows);
std::vector<WorkItem> make_segment_items(const detail::DilatedParams& p);

}  // namespace dattn::cpu
