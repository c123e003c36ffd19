// The io_uring backend: the ring wrapper (see uring.h) and the engine's thread that drives it
// (see engine.h).
#include "uring.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "engine.h"

#ifdef SLLM_HAVE_IO_URING

#include <linux/io_uring.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include <cstring>

namespace sllm_io {

namespace {

int sys_setup(unsigned entries, io_uring_params* p) {
  return static_cast<int>(::syscall(__NR_io_uring_setup, entries, p));
}

int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(
      ::syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}

int sys_register(int fd, unsigned opcode, void* arg, unsigned nr_args) {
  return static_cast<int>(::syscall(__NR_io_uring_register, fd, opcode, arg, nr_args));
}

unsigned* at(void* base, unsigned offset) {
  return reinterpret_cast<unsigned*>(static_cast<char*>(base) + offset);
}

unsigned load_acquire(const unsigned* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(unsigned* p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// Whether the kernel offers every opcode we use (the probe itself is Linux 5.6+).
bool offers_our_opcodes(int fd) {
  const std::size_t size = sizeof(io_uring_probe) + 256 * sizeof(io_uring_probe_op);
  std::vector<unsigned char> buf(size, 0);
  auto* probe = reinterpret_cast<io_uring_probe*>(buf.data());
  if (sys_register(fd, IORING_REGISTER_PROBE, probe, 256) < 0) return false;
  for (unsigned op : {unsigned{IORING_OP_READ}, unsigned{IORING_OP_POLL_ADD},
                      unsigned{IORING_OP_NOP}}) {
    if (op > probe->last_op || !(probe->ops[op].flags & IO_URING_OP_SUPPORTED)) return false;
  }
  return true;
}

}  // namespace

std::unique_ptr<Ring> Ring::open(unsigned entries, int* err) {
  std::unique_ptr<Ring> ring(new Ring());
  io_uring_params p;
  std::memset(&p, 0, sizeof p);
  ring->fd_ = sys_setup(entries, &p);
  if (ring->fd_ < 0) {
    *err = errno;
    return nullptr;
  }
  if (!offers_our_opcodes(ring->fd_)) {
    *err = ENOSYS;
    return nullptr;
  }

  ring->sq_map_size_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  ring->cq_map_size_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
  const bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single) {
    if (ring->cq_map_size_ > ring->sq_map_size_) ring->sq_map_size_ = ring->cq_map_size_;
    ring->cq_map_size_ = ring->sq_map_size_;
  }
  void* sq = ::mmap(nullptr, ring->sq_map_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                    ring->fd_, IORING_OFF_SQ_RING);
  if (sq == MAP_FAILED) {
    *err = errno;
    return nullptr;
  }
  ring->sq_map_ = sq;
  if (single) {
    ring->cq_map_ = sq;
  } else {
    void* cq = ::mmap(nullptr, ring->cq_map_size_, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, ring->fd_, IORING_OFF_CQ_RING);
    if (cq == MAP_FAILED) {
      *err = errno;
      return nullptr;
    }
    ring->cq_map_ = cq;
  }
  ring->sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
  void* sqes = ::mmap(nullptr, ring->sqes_size_, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, ring->fd_, IORING_OFF_SQES);
  if (sqes == MAP_FAILED) {
    *err = errno;
    return nullptr;
  }
  ring->sqes_ = sqes;

  ring->sq_head_ = at(sq, p.sq_off.head);
  ring->sq_tail_ = at(sq, p.sq_off.tail);
  ring->sq_mask_ = *at(sq, p.sq_off.ring_mask);
  ring->sq_entries_ = *at(sq, p.sq_off.ring_entries);
  ring->sq_local_tail_ = *ring->sq_tail_;
  unsigned* array = at(sq, p.sq_off.array);
  for (unsigned i = 0; i < ring->sq_entries_; ++i) array[i] = i;  // entry i sits in slot i
  ring->cq_head_ = at(ring->cq_map_, p.cq_off.head);
  ring->cq_tail_ = at(ring->cq_map_, p.cq_off.tail);
  ring->cq_mask_ = *at(ring->cq_map_, p.cq_off.ring_mask);
  ring->cqes_ = static_cast<char*>(ring->cq_map_) + p.cq_off.cqes;

  // One no-op round trip: a seccomp filter may allow setup and refuse enter.
  auto* nop = static_cast<io_uring_sqe*>(ring->next_entry());
  nop->opcode = IORING_OP_NOP;
  nop->user_data = 1;
  if (int e = ring->submit(true)) {
    *err = e;
    return nullptr;
  }
  bool ok = false;
  ring->reap([&](std::uint64_t user_data, std::int32_t res) { ok = user_data == 1 && res == 0; });
  if (!ok) {
    *err = EIO;
    return nullptr;
  }
  return ring;
}

Ring::~Ring() {
  if (sqes_ != nullptr) ::munmap(sqes_, sqes_size_);
  if (cq_map_ != nullptr && cq_map_ != sq_map_) ::munmap(cq_map_, cq_map_size_);
  if (sq_map_ != nullptr) ::munmap(sq_map_, sq_map_size_);
  if (fd_ >= 0) ::close(fd_);  // cancels whatever is still in flight (the engine leaves nothing)
}

void* Ring::next_entry() {
  if (sq_local_tail_ - load_acquire(sq_head_) >= sq_entries_) return nullptr;
  auto* sqe = static_cast<io_uring_sqe*>(sqes_) + (sq_local_tail_ & sq_mask_);
  std::memset(sqe, 0, sizeof *sqe);
  ++sq_local_tail_;
  return sqe;
}

bool Ring::read(int fd, void* dest, unsigned len, std::uint64_t offset, std::uint64_t user_data) {
  auto* sqe = static_cast<io_uring_sqe*>(next_entry());
  if (sqe == nullptr) return false;
  sqe->opcode = IORING_OP_READ;
  sqe->fd = fd;
  sqe->addr = reinterpret_cast<std::uintptr_t>(dest);
  sqe->len = len;
  sqe->off = offset;
  sqe->user_data = user_data;
  return true;
}

bool Ring::poll_in(int fd, std::uint64_t user_data) {
  auto* sqe = static_cast<io_uring_sqe*>(next_entry());
  if (sqe == nullptr) return false;
  sqe->opcode = IORING_OP_POLL_ADD;
  sqe->fd = fd;
  sqe->poll32_events = POLLIN;  // little-endian layout; the kernel swaps on big-endian hosts
  sqe->user_data = user_data;
  return true;
}

int Ring::submit(bool wait) {
  store_release(sq_tail_, sq_local_tail_);  // publish the entries filled in since last time
  for (;;) {
    const unsigned pending = sq_local_tail_ - load_acquire(sq_head_);
    if (pending == 0 && !wait) return 0;
    const int rc = sys_enter(fd_, pending, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0);
    if (rc >= 0) {
      if (static_cast<unsigned>(rc) >= pending) return 0;
      continue;  // the kernel took only some: hand it the rest
    }
    if (errno != EINTR) return errno;
    // EINTR: interrupted while waiting; whatever was submitted stays submitted; go round.
    if (!wait) return 0;
    if (load_acquire(cq_tail_) != *cq_head_) return 0;  // something completed meanwhile
  }
}

bool Ring::next_completion(std::uint64_t* user_data, std::int32_t* res) {
  const unsigned head = *cq_head_;
  if (head == load_acquire(cq_tail_)) return false;
  const auto* cqe = static_cast<const io_uring_cqe*>(cqes_) + (head & cq_mask_);
  *user_data = cqe->user_data;
  *res = cqe->res;
  store_release(cq_head_, head + 1);
  return true;
}

}  // namespace sllm_io

#else  // no <linux/io_uring.h>: io_uring is compiled out

namespace sllm_io {

std::unique_ptr<Ring> Ring::open(unsigned, int* err) {
  *err = ENOSYS;
  return nullptr;
}
Ring::~Ring() = default;
bool Ring::read(int, void*, unsigned, std::uint64_t, std::uint64_t) { return false; }
bool Ring::poll_in(int, std::uint64_t) { return false; }
int Ring::submit(bool) { return ENOSYS; }
bool Ring::next_completion(std::uint64_t*, std::int32_t*) { return false; }

}  // namespace sllm_io

#endif

namespace sllm_io {

// --- the engine's io_uring backend --------------------------------------------------------------

namespace {

constexpr std::uint64_t kWakeTag = 0;  // user_data of the eventfd poll; a piece's is its address

bool retry_later(int err) { return err == EAGAIN || err == EINTR; }

}  // namespace

void Engine::wake() {
  const std::uint64_t one = 1;
  // Cannot fail but with EAGAIN (the counter is full: the thread has been woken anyway).
  while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

// The ring's thread: takes requests off the queue, keeps their pieces in flight, completes them.
// It leaves once closing with nothing queued, waiting or in flight, so close() can unmap the ring.
void Engine::serve_ring() {
  std::deque<std::unique_ptr<Piece>> pending;  // cut, waiting for room in the ring
  unsigned in_flight = 0;                        // pieces only
  bool armed = false;                            // the wake-up poll is in the ring
  for (;;) {
    std::deque<std::shared_ptr<Request>> fresh;
    bool closing;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fresh.swap(queue_);
      closing = closing_;
    }
    const bool nothing_new = fresh.empty();
    for (const std::shared_ptr<Request>& req : fresh) plan(req, pending);
    while (in_flight < kQueueDepth && !pending.empty()) {
      std::unique_ptr<Piece> piece = std::move(pending.front());
      pending.pop_front();
      if (issue(piece)) {
        ++in_flight;
      } else if (piece) {  // the ring is full (cannot happen at this depth): try again later
        pending.push_front(std::move(piece));
        break;
      }
    }
    if (closing && nothing_new && pending.empty() && in_flight == 0) return;
    if (!armed) armed = ring_->poll_in(wake_fd_, kWakeTag);
    if (const int err = ring_->submit(true)) {
      // Only a broken ring gets here; reads may still be in flight into callers' memory, so the
      // process cannot carry on safely.
      std::fprintf(stderr, "sllm native_loader: io_uring_enter failed: %s\n",
                   describe(err).c_str());
      std::abort();
    }
    ring_->reap([&](std::uint64_t user_data, std::int32_t res) {
      if (user_data == kWakeTag) {
        armed = false;
        std::uint64_t count;
        while (::read(wake_fd_, &count, sizeof count) < 0 && errno == EINTR) {
        }
        return;
      }
      --in_flight;
      complete(std::unique_ptr<Piece>(reinterpret_cast<Piece*>(user_data)), res, pending);
    });
  }
}

// Cuts a new request into pieces at the back of `pending` (or finishes it, when it has none).
void Engine::plan(const std::shared_ptr<Request>& req,
                  std::deque<std::unique_ptr<Piece>>& pending) {
  if (req->nbytes == 0) {  // nothing to read, but the file must be there (as in the twin)
    try {
      descriptor(file(req->path), req->path, false, req->offset);
    } catch (const ReadFailure& e) {
      req->failure = std::make_unique<ReadFailure>(e);
    }
    finish(*req);
    return;
  }
  cut(req, req->offset, req->dest, req->nbytes, pending, false);
  if (req->pieces == 0) finish(*req);  // failed at open
}

// Cuts [at, at + len) of a request into pieces: the aligned whole blocks direct (when asked for
// and allowed), the rest buffered, each at most kPieceBytes. Pieces go to the back of `pending`,
// or to its front (in order) for the rest of a piece. An open failure fails the request.
void Engine::cut(const std::shared_ptr<Request>& req, std::int64_t at, char* to,
                 std::int64_t len, std::deque<std::unique_ptr<Piece>>& pending, bool front) {
  std::vector<std::unique_ptr<Piece>> pieces;
  try {
    std::int64_t direct_len = 0;
    if (direct_ && len >= kAlignment && aligned(static_cast<std::uint64_t>(at)) &&
        aligned(reinterpret_cast<std::uintptr_t>(to)) &&
        descriptor(file(req->path), req->path, true, req->offset) >= 0) {
      direct_len = len / kAlignment * kAlignment;
    }
    if (direct_len < len) descriptor(file(req->path), req->path, false, req->offset);
    if (is_stream_file(file(req->path))) {  // io_uring would read it from its current position
      throw ReadFailure(ESPIPE, req->path + ": cannot read at offset " + std::to_string(at) +
                                    ": " + describe(ESPIPE), req->path, at);
    }
    for (std::int64_t done = 0; done < len;) {
      const bool direct = done < direct_len;
      const std::int64_t n = std::min(kPieceBytes, (direct ? direct_len : len) - done);
      pieces.push_back(std::unique_ptr<Piece>(new Piece{req, at + done, to + done, n, direct}));
      done += n;
    }
  } catch (const ReadFailure& e) {
    fail(*req, e);
    return;
  } catch (const std::exception& e) {  // out of memory: the request fails, the thread goes on
    fail(*req, ReadFailure(EIO, req->path + ": cannot read at offset " + std::to_string(at) +
                                    ": " + e.what(), req->path, at));
    return;
  }
  req->pieces += static_cast<int>(pieces.size());
  if (front) {
    for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) pending.push_front(std::move(*it));
  } else {
    for (auto& piece : pieces) pending.push_back(std::move(piece));
  }
}

// Puts a piece in the ring; true when it went in (the ring then owns it until its completion).
// False with the piece kept when the ring is full; false with the piece gone when its file
// cannot be opened (the request is failed and, when that was its last piece, finished).
bool Engine::issue(std::unique_ptr<Piece>& piece) {
  Request& req = *piece->req;
  int fd;
  try {
    fd = descriptor(file(req.path), req.path, piece->direct, req.offset);
    if (fd < 0) {  // refused O_DIRECT since this piece was cut: read it buffered
      piece->direct = false;
      fd = descriptor(file(req.path), req.path, false, req.offset);
    }
  } catch (const ReadFailure& e) {
    fail(req, e);
    std::shared_ptr<Request> keep = std::move(piece->req);
    piece.reset();
    if (--keep->pieces == 0) finish(*keep);
    return false;
  }
  if (!ring_->read(fd, piece->to, static_cast<unsigned>(piece->len),
                   static_cast<std::uint64_t>(piece->at),
                   reinterpret_cast<std::uintptr_t>(piece.get()))) {
    return false;
  }
  piece.release();  // NOLINT(bugprone-unused-return-value): the ring's user_data holds it
  return true;
}

// Handles a piece's completion (res: bytes read, or a negative errno): resubmits what is left
// of it, or records its failure; finishes the request with its last piece.
void Engine::complete(std::unique_ptr<Piece> piece, std::int32_t res,
                      std::deque<std::unique_ptr<Piece>>& pending) {
  Request& req = *piece->req;
  const std::string& path = req.path;
  if (res < 0 && retry_later(-res)) {
    pending.push_front(std::move(piece));
    return;
  }
  if (res == -EINVAL && piece->direct) {  // opened, but direct reads are refused here
    refuse_direct(file(path));
    piece->direct = false;
    pending.push_front(std::move(piece));
    return;
  }
  if (res < 0) {
    fail(req, ReadFailure(-res, path + ": cannot read at offset " + std::to_string(piece->at) +
                                    ": " + describe(-res), path, piece->at));
  } else if (res == 0) {
    fail(req, ReadFailure(EIO, path + ": short read: file ended at offset " +
                                   std::to_string(piece->at) + ", expected " +
                                   std::to_string(req.offset + req.nbytes), path, piece->at));
  } else {
    (piece->direct ? req.direct_read : req.buffered_read) += res;
    if (res < piece->len) {  // short: cut the rest again (it may no longer be aligned)
      cut(piece->req, piece->at + res, piece->to + res, piece->len - res, pending, true);
    }
  }
  if (--req.pieces == 0) finish(req);
}

// Keeps the failure at the lowest offset (the one a sequential read would have met first).
void Engine::fail(Request& req, const ReadFailure& failure) {
  if (!req.failure || failure.offset < req.failure->offset) {
    req.failure = std::make_unique<ReadFailure>(failure);
  }
}

}  // namespace sllm_io
