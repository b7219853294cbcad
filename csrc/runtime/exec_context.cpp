#include "runtime/exec_context.hpp"

#include <algorithm>

#include "common/error.hpp"
#include "host/copy.hpp"

namespace piper::runtime {

HostContext::HostContext(host::NodeChannel* channel, int64_t world_size)
    : channel_(channel), world_size_(world_size) {}

void HostContext::copy(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
                       const plan::CopyList& blocks) {
  host::copy_blocks(src, src_bytes, dst, dst_bytes, blocks);
}

void HostContext::fence(const std::string& what, double timeout_s) {
  if (channel_) channel_->barrier(what, timeout_s);
}

void HostContext::publish_counts(int64_t seq, const std::vector<int64_t>& row) {
  PIPER_HOST_ASSERT(static_cast<int64_t>(row.size()) == world_size_);
  if (channel_)
    channel_->publish_row(seq, row.data());
  else
    private_counts_ = row;
}

std::vector<int64_t> HostContext::read_counts(int64_t seq) const {
  if (!channel_) return private_counts_;
  std::vector<int64_t> rows(channel_->local_size() * world_size_);
  channel_->read_rows(seq, rows.data());
  return rows;
}

void HostContext::ensure_segment(int64_t bytes, const std::string& what, double timeout_s) {
  if (channel_) {
    channel_->ensure_data(bytes, what, timeout_s);
  } else if (static_cast<int64_t>(private_segment_.size()) < bytes) {
    private_segment_.resize(std::max<size_t>(bytes, 2 * private_segment_.size()));
  }
}

uint8_t* HostContext::segment() const {
  return channel_ ? channel_->data() : const_cast<uint8_t*>(private_segment_.data());
}

int64_t HostContext::segment_bytes() const {
  return channel_ ? channel_->data_bytes() : static_cast<int64_t>(private_segment_.size());
}

uint8_t* HostContext::staging(int64_t bytes) {
  if (static_cast<int64_t>(staging_.size()) < bytes)
    staging_.resize(std::max<size_t>(bytes, 2 * staging_.size()));
  return staging_.data();
}

}  // namespace piper::runtime
