// A POSIX shared-memory segment: created exclusively with mode 0600, mapped, unlinked by its
// creator as soon as every user has mapped it (so a killed job leaves nothing in /dev/shm).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace piper::host {

class ShmSegment {
 public:
  ShmSegment() = default;
  /// Creates (O_CREAT | O_EXCL, 0600) and maps `bytes` bytes under `name` ("/piper-...").
  static ShmSegment create(const std::string& name, size_t bytes);
  /// Maps an existing segment created by a peer; its size is read from the segment itself.
  static ShmSegment open(const std::string& name);
  ~ShmSegment();
  ShmSegment(ShmSegment&& other) noexcept;
  ShmSegment& operator=(ShmSegment&& other) noexcept;
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;

  /// Removes the name (the mapping stays valid). Idempotent; ENOENT is not an error.
  void unlink();
  void unmap();
  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  size_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  void* addr_ = nullptr;
  size_t bytes_ = 0;
  bool owner_ = false, linked_ = false;
};

}  // namespace piper::host
