// The I/O engine's core: a pool of reader threads that read byte ranges of files into memory.
//
// Pure C++17 and POSIX; no Python, torch or CUDA headers (binding.cpp is the only Python part).
//
// How a request is read
//   submit() puts a request on a FIFO queue and returns a ticket at once; the first free worker
//   takes the oldest request, so requests complete roughly in submission order and a consumer that
//   waits for them in order overlaps its work with the reads still in flight. wait(ticket) blocks
//   until that request is done.
//
//   A worker reads with pread in a loop (short returns continue, EINTR retries, a return of 0 is
//   EOF). When O_DIRECT was asked for, the stretch of the request whose destination address, file
//   offset and length are all multiples of kAlignment goes through a descriptor opened with
//   O_DIRECT, and the unaligned rest (a file's last, partial block; a request at an odd address)
//   through a buffered one. A filesystem that refuses O_DIRECT (EINVAL at open, as tmpfs does, or
//   at the first read) is remembered per path and read buffered from then on.
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
//   close() (also run by the destructor) refuses new requests, lets the workers finish every
//   request already queued, joins them and closes the descriptors, so no thread ever writes into
//   memory after close() returns. Finished requests can still be waited after close().
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

class Engine {
 public:
  // threads: reader threads (1..kMaxThreads); direct: read with O_DIRECT where possible.
  // Throws std::invalid_argument for a bad thread count.
  Engine(int threads, bool direct);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  static constexpr int kMaxThreads = 256;

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
  // Bytes read so far through O_DIRECT descriptors and through buffered ones.
  std::uint64_t direct_bytes() const;
  std::uint64_t buffered_bytes() const;

 private:
  struct Request;
  struct File;

  void work();
  void read(Request& req);
  File& file(const std::string& path);
  int descriptor(File& f, const std::string& path, bool direct, std::int64_t offset);
  void refuse_direct(File& f);

  const int threads_;
  const bool direct_;

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
