// One all-to-all(v) call as the executor sees it: the caller's arrays reduced to pointers, rows
// and a dtype signature, the counts, the algorithm asked for and what the local checks found;
// and what the ranks agreed on before data moves.
//
// A call runs in two steps (Executor::agree, then Executor::exchange) because the caller may
// have to allocate the receive buffer in between, once the receive counts are known.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace piper::runtime {

/// The operations (their numbers are the header's OP field).
enum class Op : int64_t { kEqual = 1, kV = 2 };  // all_to_all, all_to_all_v

/// The algorithm the caller asked for (the header's ALGO field) and the one that runs.
enum class Request : int64_t { kUnknown = -1, kAuto = 0, kHalo = 1, kFlat = 2, kPairwise = 3 };
enum class Algorithm { kFlat, kPairwise, kHalo };
const char* algorithm_name(Algorithm a);

/// How a call is checked across ranks (PIPER_CHECK).
///  kTrust  (0): nothing is exchanged when the receive counts are known; a local error raises
///               on its rank only.
///  kInBand (1, default): the call's signature travels with the data where it can (the equal
///               split under flat or pairwise, on a transport with any-tag receives); otherwise
///               a header round. A mismatch found either way leads to one agreement round, so
///               every rank raises the same error.
///  kFull   (2): a header round before every call.
enum class CheckMode { kTrust = 0, kInBand = 1, kFull = 2 };

/// Local-check results (the header's ERR field; piper_comm/validate.py words them).
enum LocalError : int64_t {
  kErrNone, kErrType, kErrNonContig, kErrDevice, kErrNdim, kErrRecvType, kErrRecvNonContig,
  kErrRecvDtype, kErrCountsLen, kErrCountsNeg, kErrCountsSum, kErrRowsDiv, kErrRecvCountsLen,
  kErrRecvCountsNeg, kErrAlgorithm, kErrCountsType, kErrRecvRows, kErrMixedMemory,
  kErrOtherDevice, kErrNoCuda, kErrStream, kNumLocalErrors
};
extern const char* const kLocalErrorNames[kNumLocalErrors];

/// Where an array's memory lives (the header's MEM field: every rank must pass the same).
enum class Memory : int64_t { kHost = 0, kCuda = 1 };

/// A caller's array: `rows` rows of `row_bytes` bytes at `data` (kind 0: no array). CUDA
/// arrays also carry their device ordinal and the stream the call orders its work on (the
/// caller's current stream, a cudaStream_t as an integer; 0 the legacy default stream).
struct ArrayArg {
  uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t row_bytes = 0;
  int64_t dtype = 0;  // piper_comm.arrays.DTYPE_NAMES index + 1 (0: unknown)
  int64_t trail = 0;  // trailing_hash of shape[1:]
  int kind = 0;       // 0 absent, 1 numpy, 2 torch, 3 __cuda_array_interface__ (CuPy, ...)
  Memory mem = Memory::kHost;
  int device = -1;        // CUDA device ordinal (kCuda only)
  uintptr_t stream = 0;   // kCuda only
  int64_t nbytes() const { return rows * row_bytes; }
};

/// A stable hash of a trailing shape (shape[1:]), equal on every rank for equal shapes.
int64_t trailing_hash(const int64_t* dims, int64_t n);

struct Call {
  Op op = Op::kEqual;
  ArrayArg send, recv;
  std::vector<int64_t> send_counts;  // rows to every rank (the equal split fills them)
  std::vector<int64_t> recv_counts;  // rows from every rank; empty: not given
  Request request = Request::kAuto;
  bool exact_recv = false;           // torch.distributed: recv must have exactly the rows
  int64_t err = kErrNone, err_a = 0, err_b = 0;  // the first local error found
  int64_t seq = 0;                   // call number, the same on every rank
  std::string what;                  // "all_to_all_v #12", for errors

  /// Sets err unless set: the first error wins (the others are masked by it).
  void fail(int64_t code, int64_t a = 0, int64_t b = 0);
  /// The checks that need nothing but this rank's arguments (array checks are the caller's):
  /// rows divisible by P, counts' sum, recv's kind / dtype / shape against send's, exact_recv.
  /// Fills send_counts for the equal split.
  void check_local(int64_t P);
};

enum class Verdict {
  kOk,            // go on: recv_counts and algo are set
  kMismatch,      // `table` holds every rank's header; the caller names the problem
  kLocalError,    // kTrust only: this rank's own error (call.err), raised here only
  kRecvTooSmall,  // kTrust only: recv has fewer rows than arrive
};

struct Agreement {
  Verdict verdict = Verdict::kOk;
  std::vector<int64_t> table;        // kMismatch: P x W headers (header.hpp's layout)
  std::vector<int64_t> recv_counts;  // rows from every rank
  Algorithm algo = Algorithm::kFlat;
  bool in_band = false;              // the exchange checks the call's signature
  int64_t recv_rows() const;
};

// Tags. Call `seq` uses header_tag(seq) for its header round and data_tag(seq) for its data;
// an agreement round after a mismatch uses kAgreeTag; in-band data carries a tag from
// kInBandTagBase up, derived from the call's signature (never a header or data tag).
constexpr int kTagCalls = 16000;
constexpr int header_tag(int64_t seq) { return static_cast<int>(2 * (seq % kTagCalls)); }
constexpr int data_tag(int64_t seq) { return header_tag(seq) + 1; }
constexpr int kAgreeTag = 2 * kTagCalls + 1;
constexpr int kDeviceTag = kAgreeTag + 1;  // the collective set-up of the device plane
constexpr int kInBandTagBase = 32768;

}  // namespace piper::runtime
