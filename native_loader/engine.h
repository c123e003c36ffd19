// The I/O engine's core: reads byte ranges of files into memory, through io_uring where the
// kernel allows it, else with a pool of reader threads.
//
// Pure C++17 and POSIX (plus Linux's io_uring, see uring.h); no Python, torch or CUDA headers
// (binding.cpp is the only Python part).
//
// How a request is read
//   submit() puts a request on a FIFO queue and returns a ticket at once. wait(ticket) blocks
//   until that request is done. Requests are served oldest first, so they complete roughly in
//   submission order and a consumer that waits for them in order overlaps its work with the reads
//   still in flight. Two backends serve the queue; both give the same results and errors:
//
//   io_uring (Backend::kIoUring; the default where io_uring_setup works): one thread owns a ring
//   (raw system calls, no liburing). It takes requests off the queue, cuts each into pieces of at
//   most kPieceBytes and keeps up to kQueueDepth pieces in flight as IORING_OP_READ. The first
//   completion of an eventfd poll wakes it when submit() queues work while it waits in the
//   kernel. A piece that comes back short is resubmitted for the rest (EAGAIN and EINTR too); a
//   request is done when all its pieces are, and fails with the error of its lowest failing
//   offset. The `threads` argument is not used by this backend.
//
//   threads (Backend::kThreads; the fallback when io_uring_setup fails: ENOSYS, EPERM, seccomp,
//   old kernels, or no <linux/io_uring.h> at build time): the first free one of `threads`
//   workers takes the oldest request and reads it with pread in a loop (short returns continue,
//   EINTR retries, a return of 0 is EOF).
//
//   When O_DIRECT was asked for, the stretch of the request whose destination address, file
//   offset and length are all multiples of kAlignment goes through a descriptor opened with
//   O_DIRECT, and the unaligned rest (a file's last, partial block; a request at an odd address)
//   through a buffered one (both backends cut requests the same way; the rest of a piece after a
//   short read is cut again). A filesystem that refuses O_DIRECT (EINVAL at open, as tmpfs does,
//   or at the first read) is remembered per path and read buffered from then on.
//   Never does a direct read land past the end of the request: a direct read writes whole blocks,
//   so only whole blocks inside the request are read that way.
//
//   Descriptors are opened once per path per engine (lazily, one direct and one buffered at most)
//   and closed by close(). A file replaced under the same path while an engine is open keeps being
//   read from the old inode; engines are short-lived (one per checkpoint load).
//
// Errors
//   A failed request keeps a ReadFailure (errno, message naming the file and offset) that wait()
//   throws; the message formats are those of the Python twin, native_loader/reader.py.
//
// Lifetime
//   close() (also run by the destructor) refuses new requests, lets the workers (or the ring's
//   thread) finish every request already queued, joins them and closes the descriptors, so no
//   thread and no kernel read ever writes into memory after close() returns. Finished requests
//   can still be waited after close().
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sllm_io {

// Direct reads need the address, offset and length aligned to this (a safe bound for the logical
// block size of every common device and filesystem).
constexpr std::int64_t kAlignment = 4096;

inline bool aligned(std::uint64_t x) { return x % static_cast<std::uint64_t>(kAlignment) == 0; }

// strerror's text for an errno value (thread-safe).
std::string describe(int err);

// A read failed: the file is missing or unreadable, or it ended before the range did.
class ReadFailure : public std::runtime_error {
 public:
  ReadFailure(int err, const std::string& message, std::string path, std::int64_t offset)
      : std::runtime_error(message), err(err), path(std::move(path)), offset(offset) {}
  int err;             // errno (EIO for a short read)
  std::string path;    // the file
  std::int64_t offset; // byte offset within the file where the failure happened
};

// wait() on a ticket that was never issued or has already been waited.
class UnknownTicket : public std::out_of_range {
 public:
  explicit UnknownTicket(std::int64_t ticket)
      : std::out_of_range("unknown ticket " + std::to_string(ticket)), ticket(ticket) {}
  std::int64_t ticket;
};

// submit() after close().
class EngineClosed : public std::logic_error {
 public:
  EngineClosed() : std::logic_error("cannot submit a read: the reader is closed") {}
};

// How requests are read: kAuto is io_uring where the kernel allows it, else threads.
enum class Backend { kAuto, kIoUring, kThreads };

// Engine(..., Backend::kIoUring) where io_uring cannot be used.
class BackendUnavailable : public std::runtime_error {
 public:
  explicit BackendUnavailable(const std::string& why)
      : std::runtime_error("io_uring is not available: " + why) {}
};

class Ring;

class Engine {
 public:
  // threads: reader threads (1..kMaxThreads) of the threads backend; direct: read with O_DIRECT
  // where possible. Throws std::invalid_argument for a bad thread count, BackendUnavailable.
  Engine(int threads, bool direct, Backend backend = Backend::kAuto);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  static constexpr int kMaxThreads = 256;
  // The io_uring backend: the most bytes one read asks for, and the most reads in flight.
  static constexpr std::int64_t kPieceBytes = std::int64_t{8} << 20;
  static constexpr unsigned kQueueDepth = 64;

  // Queues a read of nbytes bytes at file_offset of path into dest; never blocks on I/O. The
  // caller keeps dest alive until wait() returns for the ticket (or close() returns).
  // Throws std::invalid_argument (negative offset or size, null dest with nbytes > 0),
  // EngineClosed.
  std::int64_t submit(const std::string& path, std::int64_t file_offset, std::int64_t nbytes,
                      void* dest);

  // Blocks until the request is done; returns the bytes read. Each ticket can be waited once.
  // Throws ReadFailure (the request failed), UnknownTicket.
  std::int64_t wait(std::int64_t ticket);

  // Finishes queued requests, joins the threads, closes the descriptors. Idempotent.
  void close();

  int threads() const { return threads_; }
  bool direct() const { return direct_; }
  // The backend in use: kIoUring or kThreads (never kAuto).
  Backend backend() const { return backend_; }
  // Bytes read so far through O_DIRECT descriptors and through buffered ones.
  std::uint64_t direct_bytes() const;
  std::uint64_t buffered_bytes() const;

 private:
  // A request: read nbytes at offset of path into dest.
  struct Request {
    std::string path;
    std::int64_t offset;
    std::int64_t nbytes;
    char* dest;
    // Written by the worker before `done` is set under mu_; read by wait() after.
    bool done = false;
    int pieces = 0;  // the io_uring backend: pieces not yet completed (its thread only)
    std::int64_t direct_read = 0;
    std::int64_t buffered_read = 0;
    std::unique_ptr<ReadFailure> failure;
  };

  // The io_uring backend: one read in flight (or waiting for room in the ring).
  struct Piece {
    std::shared_ptr<Request> req;
    std::int64_t at;  // file offset
    char* to;
    std::int64_t len;
    bool direct;
  };

  // A file's descriptors, opened on first use.
  struct File {
    int direct_fd = -1;
    int buffered_fd = -1;
    bool direct_refused = false;  // the filesystem refused O_DIRECT for this file
    bool stream = false;  // a FIFO or socket: no reading at an offset (pread gives ESPIPE)
  };

  void work();
  void read(Request& req);
  void finish(Request& req);
  void wake();
  // The io_uring backend (uring.cpp).
  void serve_ring();
  void plan(const std::shared_ptr<Request>& req, std::deque<std::unique_ptr<Piece>>& pending);
  void cut(const std::shared_ptr<Request>& req, std::int64_t at, char* to, std::int64_t len,
           std::deque<std::unique_ptr<Piece>>& pending, bool front);
  bool issue(std::unique_ptr<Piece>& piece);
  void complete(std::unique_ptr<Piece> piece, std::int32_t res,
                std::deque<std::unique_ptr<Piece>>& pending);
  void fail(Request& req, const ReadFailure& failure);
  File& file(const std::string& path);
  int descriptor(File& f, const std::string& path, bool direct, std::int64_t offset);
  void refuse_direct(File& f);
  bool is_stream_file(File& f);

  const int threads_;
  const bool direct_;
  Backend backend_ = Backend::kThreads;
  std::unique_ptr<Ring> ring_;  // the io_uring backend's, owned by its thread once started
  int wake_fd_ = -1;            // eventfd: submit() wakes the ring's thread

  mutable std::mutex mu_;            // guards everything below up to close_mu_
  std::condition_variable work_cv_;  // a request was queued, or closing
  std::condition_variable done_cv_;  // a request finished
  std::deque<std::shared_ptr<Request>> queue_;
  std::unordered_map<std::int64_t, std::shared_ptr<Request>> requests_;  // not yet waited
  std::int64_t next_ticket_ = 0;
  bool closing_ = false;
  std::uint64_t direct_bytes_ = 0;
  std::uint64_t buffered_bytes_ = 0;

  std::mutex close_mu_;  // one close() joins; the others wait for it
  std::vector<std::thread> workers_;

  std::mutex files_mu_;  // guards files_ and each File's descriptors
  std::unordered_map<std::string, std::unique_ptr<File>> files_;
};

}  // namespace sllm_io
