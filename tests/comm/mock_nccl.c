/* A mock NCCL for testing Piper's NCCL transport (csrc/cuda/nccl_transport.cpp) on hosts
 * without a GPU: the 13 entry points Piper resolves, with NCCL's signatures (nccl.h of the
 * nvidia-nccl wheel, the header Piper is built against), moving *host* bytes over MPI.
 *
 * Built by tests/comm/test_nccl_mock.py into libnccl.so.2 and loaded by Piper as any NCCL
 * (Executor.emulate_device_plane(channel, nccl_library=path)). Under mpirun: MPI is already
 * initialised by the process (mpi4py); the mock's messages use MPI_COMM_WORLD with tags of its
 * own (Piper's MPI transport works on a duplicate of it, so they never meet).
 *
 * What it models of NCCL (and what a test may rely on):
 * - a unique id made by one rank and passed by the caller; ncclCommInitRankConfig joins the
 *   ranks of that id. With config->blocking = 0 (what Piper asks) it returns ncclInProgress
 *   and the join completes inside later ncclCommGetAsyncError calls (a handshake through the
 *   root), so a rank that never joins leaves the others "in progress" for ever, as NCCL does;
 * - ncclGroupStart/End around ncclSend/ncclRecv: a group's messages are posted at the
 *   outermost ncclGroupEnd, matched per pair in posting order (MPI's non-overtaking order on
 *   one tag). Unlike NCCL, a group settles (ncclCommGetAsyncError: ncclSuccess) only once its
 *   data moved, not once it is enqueued on a stream: the host context reads the receive
 *   buffers as soon as the transport reports the batch done;
 * - ncclCommAbort cancels what is pending and frees the communicator; ncclCommFinalize settles
 *   at once (not collective here); ncclGetLastError names the last failure.
 *
 * Failure injection, read from the environment at each communicator's creation:
 *   PIPER_MOCK_NCCL_FAIL=init:R        NCCL rank R's ncclCommInitRankConfig fails (system error)
 *   PIPER_MOCK_NCCL_FAIL=hang_init:R   rank R never completes its join (its peers wait)
 *   PIPER_MOCK_NCCL_FAIL=group:R:K     rank R's K-th group (from 1) reports a remote error
 *                                      without posting its messages (its peers wait)
 *   PIPER_MOCK_NCCL_FAIL=usage:R:K     the same with an invalid-usage error (what NCCL says to
 *                                      ranks sharing a GPU without NCCL_MULTI_RANK_GPU_ENABLE)
 */
#include <mpi.h>
#include <nccl.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MOCK_MAGIC 0x4d4f434b4e43434cULL /* "MOCKNCCL" */
#define MOCK_TAG_BASE 21000              /* tags 21000..22999: within MPI's guaranteed 32767 */
#define MOCK_TAG_SPAN 1000
#define MOCK_MAX_OPS 4096

struct mock_id {
  unsigned long long magic;
  int root_world; /* MPI_COMM_WORLD rank of the NCCL rank 0 */
  int seq;        /* the root's count of ids: tells communicators apart */
};

enum fail_kind { FAIL_NONE, FAIL_INIT, FAIL_HANG_INIT, FAIL_GROUP, FAIL_USAGE };

struct ncclComm {
  int rank, nranks, root_world, tag_init, tag_data;
  int* world; /* MPI_COMM_WORLD rank of each NCCL rank (known once joined) */
  int joined, join_step;
  int join_msg[2];
  int* join_bufs;              /* root: each peer's (rank, world rank) */
  MPI_Request* reqs;           /* outstanding requests: the join's, then a group's */
  char* is_recv;               /* per request: a receive (cancelled on abort) */
  int nreqs, cap;
  ncclResult_t error;          /* sticky asynchronous error */
  enum fail_kind fail;
  int fail_group, groups;
  char last_error[256];
};

static __thread int group_depth = 0;
static __thread int num_ops = 0;
static __thread struct op {
  int send;
  void* buf;
  size_t bytes;
  int peer;
  ncclComm_t comm;
} ops[MOCK_MAX_OPS];
static int id_seq = 0;
static char global_error[256] = "";

static ncclResult_t fail_with(ncclComm_t comm, ncclResult_t r, const char* why) {
  snprintf(comm ? comm->last_error : global_error, sizeof(global_error), "mock NCCL: %s", why);
  return r;
}

static int mpi_ready(void) {
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  return up && !down;
}

static void add_request(ncclComm_t comm, MPI_Request r, int recv) {
  if (comm->nreqs == comm->cap) {
    comm->cap = comm->cap ? 2 * comm->cap : 16;
    comm->reqs = realloc(comm->reqs, sizeof(MPI_Request) * (size_t)comm->cap);
    comm->is_recv = realloc(comm->is_recv, (size_t)comm->cap);
  }
  comm->is_recv[comm->nreqs] = (char)recv;
  comm->reqs[comm->nreqs++] = r;
}

/* True when every outstanding request completed (they are then released). */
static int requests_done(ncclComm_t comm) {
  int done = 1;
  if (comm->nreqs > 0) {
    MPI_Testall(comm->nreqs, comm->reqs, &done, MPI_STATUSES_IGNORE);
    if (done) comm->nreqs = 0;
  }
  return done;
}

/* Receives are cancelled; sends are let go (MPI_Request_free: they complete on their own;
 * cancelling a send is deprecated since MPI 4 and unreliable). */
static void cancel_requests(ncclComm_t comm) {
  for (int i = 0; i < comm->nreqs; ++i) {
    if (comm->reqs[i] == MPI_REQUEST_NULL) continue;
    if (comm->is_recv[i]) MPI_Cancel(&comm->reqs[i]);
    MPI_Request_free(&comm->reqs[i]);
  }
  comm->nreqs = 0;
}

static void read_failure(ncclComm_t comm) {
  const char* f = getenv("PIPER_MOCK_NCCL_FAIL");
  int r = -1, k = 0;
  comm->fail = FAIL_NONE;
  if (f == NULL || *f == '\0') return;
  if (sscanf(f, "group:%d:%d", &r, &k) == 2 && r == comm->rank) {
    comm->fail = FAIL_GROUP;
    comm->fail_group = k;
  } else if (sscanf(f, "usage:%d:%d", &r, &k) == 2 && r == comm->rank) {
    comm->fail = FAIL_USAGE;
    comm->fail_group = k;
  } else if (sscanf(f, "hang_init:%d", &r) == 1 && r == comm->rank) {
    comm->fail = FAIL_HANG_INIT;
  } else if (sscanf(f, "init:%d", &r) == 1 && r == comm->rank) {
    comm->fail = FAIL_INIT;
  }
}

/* The join: every rank sends (rank, world rank) to the root, which answers with the table.
 * Advanced without blocking; returns 1 once joined. */
static int advance_join(ncclComm_t comm) {
  if (comm->joined) return 1;
  if (comm->fail == FAIL_HANG_INIT) return 0;
  if (!requests_done(comm)) return 0;
  if (comm->join_step == 0 && comm->rank == 0) { /* the peers' rows arrived: answer */
    for (int i = 0; i < comm->nranks - 1; ++i)
      comm->world[comm->join_bufs[2 * i]] = comm->join_bufs[2 * i + 1];
    for (int r = 1; r < comm->nranks; ++r) {
      MPI_Request q;
      MPI_Isend(comm->world, comm->nranks, MPI_INT, comm->world[r], comm->tag_init,
                MPI_COMM_WORLD, &q);
      add_request(comm, q, 0);
    }
    comm->join_step = 1;
    return advance_join(comm);
  }
  comm->joined = 1; /* root: answers sent; others: the table arrived */
  return 1;
}

ncclResult_t ncclGetVersion(int* version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* out) {
  if (!mpi_ready()) return fail_with(NULL, ncclSystemError, "MPI is not initialised");
  struct mock_id id = {MOCK_MAGIC, 0, id_seq++};
  MPI_Comm_rank(MPI_COMM_WORLD, &id.root_world);
  memset(out, 0, sizeof(*out));
  memcpy(out->internal, &id, sizeof(id));
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* out, int nranks, ncclUniqueId uid, int rank,
                                    ncclConfig_t* config) {
  struct mock_id id;
  memcpy(&id, uid.internal, sizeof(id));
  *out = NULL;
  if (!mpi_ready()) return fail_with(NULL, ncclSystemError, "MPI is not initialised");
  if (id.magic != MOCK_MAGIC || rank < 0 || rank >= nranks)
    return fail_with(NULL, ncclInvalidArgument, "bad unique id, rank or size");
  ncclComm_t comm = calloc(1, sizeof(struct ncclComm));
  comm->rank = rank;
  comm->nranks = nranks;
  comm->root_world = id.root_world;
  comm->tag_init = MOCK_TAG_BASE + 2 * (id.seq % MOCK_TAG_SPAN);
  comm->tag_data = comm->tag_init + 1;
  comm->world = calloc((size_t)nranks, sizeof(int));
  read_failure(comm);
  if (comm->fail == FAIL_INIT) {
    fail_with(NULL, ncclSystemError, "injected failure of ncclCommInitRankConfig");
    free(comm->world);
    free(comm);
    return ncclSystemError;
  }
  int me = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  comm->world[rank] = me;
  MPI_Request q;
  if (rank == 0) {
    comm->join_bufs = calloc((size_t)(2 * nranks), sizeof(int));
    for (int i = 0; i < nranks - 1; ++i) {
      MPI_Irecv(&comm->join_bufs[2 * i], 2, MPI_INT, MPI_ANY_SOURCE, comm->tag_init,
                MPI_COMM_WORLD, &q);
      add_request(comm, q, 1);
    }
  } else if (comm->fail != FAIL_HANG_INIT) {
    comm->join_msg[0] = rank, comm->join_msg[1] = me;
    MPI_Isend(comm->join_msg, 2, MPI_INT, comm->root_world, comm->tag_init, MPI_COMM_WORLD, &q);
    add_request(comm, q, 0);
    MPI_Irecv(comm->world, nranks, MPI_INT, comm->root_world, comm->tag_init, MPI_COMM_WORLD,
              &q);
    add_request(comm, q, 1);
  }
  *out = comm;
  const int blocking = config == NULL || config->blocking != 0;
  if (!blocking) return advance_join(comm) ? ncclSuccess : ncclInProgress;
  while (!advance_join(comm)) {
  }
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  if (comm == NULL) return ncclInvalidArgument;
  if (comm->error != ncclSuccess) {
    *state = comm->error;
  } else if (!advance_join(comm) || !requests_done(comm)) {
    *state = ncclInProgress;
  } else {
    *state = ncclSuccess;
  }
  return ncclSuccess;
}

ncclResult_t ncclGroupStart(void) {
  ++group_depth;
  return ncclSuccess;
}

static ncclResult_t post(ncclComm_t comm, const struct op* o) {
  MPI_Request q;
  if (o->bytes > (size_t)0x7fffffff)
    return fail_with(comm, ncclInvalidUsage, "message over 2 GiB (the mock's MPI count)");
  if (o->send)
    MPI_Isend(o->buf, (int)o->bytes, MPI_BYTE, comm->world[o->peer], comm->tag_data,
              MPI_COMM_WORLD, &q);
  else
    MPI_Irecv(o->buf, (int)o->bytes, MPI_BYTE, comm->world[o->peer], comm->tag_data,
              MPI_COMM_WORLD, &q);
  add_request(comm, q, !o->send);
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
  if (group_depth <= 0) return fail_with(NULL, ncclInvalidUsage, "ncclGroupEnd without start");
  if (--group_depth > 0) return ncclSuccess;
  ncclResult_t result = ncclSuccess;
  ncclComm_t counted = NULL; /* a group counts once per communicator it touches (one here) */
  for (int i = 0; i < num_ops; ++i) {
    ncclComm_t comm = ops[i].comm;
    if (comm != counted) {
      counted = comm;
      if (++comm->groups == comm->fail_group && comm->fail == FAIL_GROUP)
        comm->error = fail_with(comm, ncclRemoteError, "injected remote error in a group");
      if (comm->groups == comm->fail_group && comm->fail == FAIL_USAGE)
        comm->error = fail_with(comm, ncclInvalidUsage, "injected invalid usage in a group");
    }
    if (comm->error != ncclSuccess) continue; /* reported by ncclCommGetAsyncError */
    if (post(comm, &ops[i]) != ncclSuccess) result = ncclInvalidUsage;
  }
  if (num_ops > 0 && result == ncclSuccess && !requests_done(ops[0].comm)) result = ncclInProgress;
  num_ops = 0;
  return result;
}

static ncclResult_t add_op(int send, void* buf, size_t count, ncclDataType_t type, int peer,
                           ncclComm_t comm) {
  static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
  if (comm == NULL || !comm->joined) return ncclInvalidUsage;
  if (peer < 0 || peer >= comm->nranks) return fail_with(comm, ncclInvalidArgument, "bad peer");
  if ((int)type < 0 || (size_t)type >= sizeof(sizes) / sizeof(sizes[0]))
    return fail_with(comm, ncclInvalidArgument, "bad data type");
  if (num_ops == MOCK_MAX_OPS) return fail_with(comm, ncclInvalidUsage, "too many operations");
  struct op o = {send, buf, count * sizes[type], peer, comm};
  ops[num_ops++] = o;
  if (group_depth == 0) { /* outside a group: a group of one */
    ++group_depth;
    return ncclGroupEnd();
  }
  return ncclSuccess;
}

ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  (void)stream;
  return add_op(1, (void*)buf, count, type, peer, comm);
}

ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  (void)stream;
  return add_op(0, buf, count, type, peer, comm);
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  if (comm == NULL) return ncclInvalidArgument;
  return comm->error;
}

static void release(ncclComm_t comm) {
  free(comm->reqs);
  free(comm->is_recv);
  free(comm->world);
  free(comm->join_bufs);
  free(comm);
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == NULL) return ncclInvalidArgument;
  if (comm->nreqs > 0) return fail_with(comm, ncclInvalidUsage, "destroyed with work pending");
  release(comm);
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == NULL) return ncclSuccess;
  cancel_requests(comm);
  release(comm);
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  return comm ? comm->last_error : global_error;
}
