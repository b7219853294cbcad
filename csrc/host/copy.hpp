// Block copies on the host: the pack and unpack steps of every algorithm.
#pragma once

#include <cstdint>

#include "plan/schedule.hpp"

namespace piper::host {

/// Copies every block of `blocks` from src to dst. Every block is checked against the two
/// buffers' sizes first, so a bad plan can never write outside them.
void copy_blocks(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
                 const plan::CopyList& blocks);

}  // namespace piper::host
