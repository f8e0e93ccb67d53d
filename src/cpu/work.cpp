#include "cpu/work.hpp"

namespace dattn::cpu {

std::int64_t selected_count(std::int64_t segment_length, std::int64_t offset, std::int64_t stride) {
  return offset < segment_length ? (segment_length - offset + stride - 1) / stride : 0;
}

RowRange query_rows(const detail::DilatedParams& p) { return {p.query_position, p.query_position + p.seqlen}; }
RowRange key_rows(const detail::DilatedParams& p) { return {p.key_begin, p.key_end}; }
RowRange own_rows(const detail::DilatedParams& p, bool key_side) { return key_side ? key_rows(p) : query_rows(p); }
RowRange other_rows(const detail::DilatedParams& p, bool key_side) { return key_side ? query_rows(p) : key_rows(p); }

std::vector<WorkItem> make_work_items(const detail::DilatedParams& p, bool key_side) {
  std::vector<WorkItem> items;
  const RowRange own = own_rows(p, key_side);
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < p.heads; ++h) {
      if (p.block_size > 0) {
        for (std::int64_t begin = own.begin; begin < own.end; begin += p.block_size) {
          WorkItem item{b, h, begin, std::min(begin + p.block_size, own.end), -1, key_side, begin, 1, 0, 0};
          item.state_rows = item.region_end - item.region_begin;
          for_each_group(p, item, [&](const Group& g) { item.cost += double(g.end - g.begin) * double(g.other_length); });
          item.cost += double(item.state_rows);
          items.push_back(item);
        }
      } else if (p.mode == Mode::grouped) {
        for (int i = 0; i < p.num_branches; ++i) {
          const detail::Branch& br = p.branches[i];
          if (h < br.first_head || h >= br.first_head + br.head_count) continue;
          const std::int64_t w = br.segment_length, r = br.dilation_rate, o = br.group_offset;
          // Each segment's part of the own rows, cut into chunks of its selected rows.
          for (std::int64_t start = own.begin / w * w; start < own.end; start += w) {
            const std::int64_t first = start + o, length = selected_count(std::min(w, p.global_length - start), o, r);
            const std::int64_t region_begin = std::max(start, own.begin), region_end = std::min(start + w, own.end);
            const std::int64_t lo = std::max<std::int64_t>(0, (region_begin - first + r - 1) / r);
            const std::int64_t hi = std::max(lo, std::min(length, (region_end - first + r - 1) / r));
            const std::int64_t chunks = std::max<std::int64_t>(1, (hi - lo + kChunkRows - 1) / kChunkRows);
            for (std::int64_t t = 0; t < chunks; ++t) {
              WorkItem item{b, h, 0, 0, i, key_side, first + (lo + t * kChunkRows) * r, r, 0, 0};
              item.region_begin = t == 0 ? region_begin : item.state_base;
              item.region_end = t + 1 == chunks ? region_end : first + (lo + (t + 1) * kChunkRows) * r;
              item.state_rows = std::clamp<std::int64_t>(hi - lo - t * kChunkRows, 0, kChunkRows);
              item.cost = double(item.state_rows) * double(length) + double(item.region_end - item.region_begin);
              items.push_back(item);
            }
          }
        }
      } else {
        std::int64_t max_rate = 1;
        for (int i = 0; i < p.num_branches; ++i) max_rate = std::max(max_rate, p.branches[i].dilation_rate);
        const std::int64_t rows = kTileRows * std::min(max_rate, kMaxLongnetStride);
        for (std::int64_t begin = own.begin; begin < own.end; begin += rows) {
          WorkItem item{b, h, begin, std::min(begin + rows, own.end), -1, key_side, begin, 1, 0, 0};
          item.state_rows = item.region_end - item.region_begin;
          for_each_group(p, item, [&](const Group& g) { item.cost += double(g.end - g.begin) * double(g.other_length); });
          items.push_back(item);
        }
      }
    }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

bool segment_backward_applies(const detail::DilatedParams& p, std::int64_t min_rows) {
  if (p.mode != Mode::grouped || p.block_size > 0 || p.accumulate || !p.run_query_pass || !p.run_key_pass ||
      !p.whole_sequence())
    return false;
  for (int i = 0; i < p.num_branches; ++i) {
    const detail::Branch& br = p.branches[i];
    if (br.head_count == 0) continue;
    for (std::int64_t start = 0; start < p.seqlen; start += br.segment_length) {
      const std::int64_t length =
          selected_count(std::min(br.segment_length, p.seqlen - start), br.group_offset, br.dilation_rate);
      if (length > 0 && length < min_rows) return false;
    }
  }
  return true;
}

std::vector<WorkItem> make_segment_items(const detail::DilatedParams& p) {
  std::vector<WorkItem> items;
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (int i = 0; i < p.num_branches; ++i) {
      const detail::Branch& br = p.branches[i];
      const std::int64_t w = br.segment_length, r = br.dilation_rate, o = br.group_offset;
      for (std::int64_t h = br.first_head; h < br.first_head + br.head_count; ++h)
        for (std::int64_t start = 0; start < p.seqlen; start += w) {
          const std::int64_t end = std::min(start + w, p.seqlen), length = selected_count(end - start, o, r);
          WorkItem item{b, h, start, end, i, false, start + o, r, length, 0};
          item.cost = double(length) * double(length) + double(end - start);
          items.push_back(item);
        }
    }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

}  // namespace dattn::cpu
