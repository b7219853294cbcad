#include "host/process.hpp"

#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace piper::host {

bool process_alive(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) < 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return errno != ENOENT;
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* paren = std::strrchr(buf, ')');
  return paren == nullptr || paren[1] == 0 || (paren[2] != 'Z' && paren[2] != 'X');
}

}  // namespace piper::host
