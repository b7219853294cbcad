#include "cuda/ipc_record.hpp"

#include <algorithm>
#include <cstring>

#include "common/error.hpp"

namespace piper::cuda {
namespace {
constexpr uint64_t kRecordMagic = 0x5049504552435544ull;  // "PIPERCUD"
}  // namespace

IpcRecord empty_record() {
  IpcRecord r;
  std::memset(&r, 0, sizeof(r));
  r.magic = kRecordMagic;
  return r;
}

void write_record(uint8_t* area, int64_t area_bytes, const IpcRecord& r) {
  PIPER_HOST_ASSERT(area != nullptr && static_cast<int64_t>(sizeof(IpcRecord)) <= area_bytes);
  std::memcpy(area, &r, sizeof(r));
}

IpcRecord read_record(const uint8_t* area, int64_t area_bytes, int64_t rank,
                      const std::string& what) {
  PIPER_HOST_ASSERT(area != nullptr && static_cast<int64_t>(sizeof(IpcRecord)) <= area_bytes);
  IpcRecord r;
  std::memcpy(&r, area, sizeof(r));
  if (r.magic != kRecordMagic)
    throw Error(ErrorCode::kSystem,
                fmt("piper: ", what, ": rank ", rank,
                    " published no CUDA IPC record in the node's shared memory (every rank of a "
                    "node must use the same memory kind: all CUDA or all host)"));
  r.bus_id[sizeof(r.bus_id) - 1] = '\0';
  r.error[sizeof(r.error) - 1] = '\0';
  return r;
}

void check_segment(const IpcRecord& r, int64_t owner, int64_t gen, int64_t bytes,
                   const std::string& what) {
  if (r.error[0] != '\0')
    throw Error(ErrorCode::kSystem, fmt("piper: ", what, ": rank ", owner,
                                        " could not create the node's device segment of ", bytes,
                                        " B: ", r.error));
  if (r.segment_gen != gen || r.segment_bytes < bytes)
    throw Error(ErrorCode::kInternal,
                fmt("piper internal error: ", what, ": rank ", owner, " published segment ",
                    "generation ", r.segment_gen, " of ", r.segment_bytes, " B, expected ",
                    "generation ", gen, " of at least ", bytes, " B"));
}

std::vector<int64_t> device_table(const plan::CopyList& blocks, int64_t src_bytes,
                                  int64_t dst_bytes, const std::string& what) {
  const size_t n = blocks.len.size();
  PIPER_HOST_ASSERT(blocks.src_off.size() == n && blocks.dst_off.size() == n);
  size_t kept = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = blocks.src_off[i], d = blocks.dst_off[i], len = blocks.len[i];
    if (len < 0 || s < 0 || d < 0 || s > src_bytes - len || d > dst_bytes - len)
      throw Error(ErrorCode::kInternal,
                  fmt("piper internal error: ", what, ": block ", i, " [", s, ", +", len,
                      ") -> [", d, ", +", len, ") exceeds buffers of ", src_bytes, " B / ",
                      dst_bytes, " B"));
    kept += len > 0;
  }
  std::vector<int64_t> table(3 * kept);
  size_t k = 0;
  for (size_t i = 0; i < n; ++i) {
    if (blocks.len[i] == 0) continue;
    table[k] = blocks.src_off[i];
    table[kept + k] = blocks.dst_off[i];
    table[2 * kept + k] = blocks.len[i];
    ++k;
  }
  return table;
}

int64_t grown_segment_bytes(int64_t bytes, int64_t current) {
  const int64_t want = std::max({bytes, 2 * current, kMinSegmentBytes});
  return (want + kSegmentGranule - 1) / kSegmentGranule * kSegmentGranule;
}

}  // namespace piper::cuda
