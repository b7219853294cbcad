#include "host/shm_segment.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "common/error.hpp"

namespace piper::host {

namespace {
void* map_fd(int fd, size_t bytes, const std::string& name) {
  void* addr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (addr == MAP_FAILED) {
    const int err = errno;
    close(fd);
    throw Error(ErrorCode::kSystem, fmt("piper: mmap of shared segment ", name, " (", bytes,
                                        " B) failed: ", std::strerror(err)));
  }
  return addr;
}
}  // namespace

ShmSegment ShmSegment::create(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0)
    throw Error(ErrorCode::kSystem, fmt("piper: shm_open(", name, ", O_CREAT|O_EXCL, 0600) failed: ",
                                        std::strerror(errno)));
  ShmSegment seg;
  seg.name_ = name;
  seg.owner_ = seg.linked_ = true;
  seg.bytes_ = bytes;
  if (ftruncate(fd, static_cast<off_t>(bytes)) < 0) {
    const int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    throw Error(ErrorCode::kSystem, fmt("piper: cannot size shared segment ", name, " to ", bytes,
                                        " B (is /dev/shm full?): ", std::strerror(err)));
  }
  seg.addr_ = map_fd(fd, bytes, name);
  close(fd);
  return seg;
}

ShmSegment ShmSegment::open(const std::string& name) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0)
    throw Error(ErrorCode::kSystem,
                fmt("piper: shm_open(", name, ") failed: ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) < 0) {
    close(fd);
    throw Error(ErrorCode::kSystem, fmt("piper: fstat(", name, ") failed: ", std::strerror(errno)));
  }
  ShmSegment seg;
  seg.name_ = name;
  seg.bytes_ = static_cast<size_t>(st.st_size);
  seg.addr_ = map_fd(fd, seg.bytes_, name);
  close(fd);
  return seg;
}

ShmSegment::~ShmSegment() {
  unlink();
  unmap();
}

ShmSegment::ShmSegment(ShmSegment&& other) noexcept { *this = std::move(other); }

ShmSegment& ShmSegment::operator=(ShmSegment&& other) noexcept {
  if (this != &other) {
    unlink();
    unmap();
    name_ = std::move(other.name_);
    addr_ = std::exchange(other.addr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    owner_ = std::exchange(other.owner_, false);
    linked_ = std::exchange(other.linked_, false);
  }
  return *this;
}

void ShmSegment::unlink() {
  if (owner_ && linked_) {
    shm_unlink(name_.c_str());  // ENOENT (already gone) is fine
    linked_ = false;
  }
}

void ShmSegment::unmap() {
  if (addr_ != nullptr) {
    munmap(addr_, bytes_);
    addr_ = nullptr;
  }
}

}  // namespace piper::host
