#include "runtime/message_summary.hpp"

#include <sstream>

namespace piper::runtime {

void MessageSummary::add(const Message& m) {
  ++messages_;
  (m.send ? sent_ : received_) += m.bytes;
  if (m.bytes <= 0 || m.peer < 0) return;
  const auto q = static_cast<size_t>(m.peer);
  if (q >= seen_.size()) seen_.resize(q + 1, 0);
  if (!seen_[q]) {
    seen_[q] = 1;
    peers_.push_back(m.peer);
  }
}

std::string MessageSummary::take() {
  std::ostringstream out;
  out << messages_ << " messages (" << sent_ << " B sent, " << received_
      << " B received; peers ";
  for (size_t i = 0; i < peers_.size() && i < kNamedPeers; ++i) out << (i ? ", " : "") << peers_[i];
  if (peers_.size() > kNamedPeers) out << ", ... (" << peers_.size() << " peers)";
  out << ")";
  for (const int64_t q : peers_) seen_[static_cast<size_t>(q)] = 0;
  peers_.clear();
  messages_ = sent_ = received_ = 0;
  return out.str();
}

}  // namespace piper::runtime
