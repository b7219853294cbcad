#include "host/copy.hpp"

#include <cstring>

#include "common/error.hpp"

namespace piper::host {

void copy_blocks(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
                 const plan::CopyList& blocks) {
  const size_t n = blocks.len.size();
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = blocks.src_off[i], d = blocks.dst_off[i], len = blocks.len[i];
    if (len < 0 || s < 0 || d < 0 || s + len > src_bytes || d + len > dst_bytes)
      throw Error(ErrorCode::kInternal,
                  fmt("piper internal error: block ", i, " [", s, ", +", len, ") -> [", d, ", +",
                      len, ") exceeds buffers of ", src_bytes, " B / ", dst_bytes, " B"));
  }
  for (size_t i = 0; i < n; ++i)
    std::memcpy(dst + blocks.dst_off[i], src + blocks.src_off[i], blocks.len[i]);
}

}  // namespace piper::host
