// MessageSummary: a batch of messages in one line, as a watchdog or an error names it.
//
// "6 messages (4096 B sent, 4096 B received; peers 1, 3)": the messages' count, the bytes each
// way, and the peers of the non-empty messages in order of first appearance (at most
// kNamedPeers, then "... (N peers)"). One pass, and no allocation once its buffers have grown:
// a flat exchange on P ranks is 2P messages to P peers, which a search per message would make
// O(P^2) on every call. Not thread-safe: one per owner (the NCCL transport, under its lock).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/transport.hpp"

namespace piper::runtime {

class MessageSummary {
 public:
  static constexpr size_t kNamedPeers = 8;

  void add(const Message& m);
  /// The line for the messages added since the last take(); starts a new batch.
  std::string take();

 private:
  int64_t messages_ = 0, sent_ = 0, received_ = 0;
  std::vector<int64_t> peers_;   // distinct peers of non-empty messages, in order
  std::vector<uint8_t> seen_;    // a flag per peer rank, cleared by take()
};

}  // namespace piper::runtime
