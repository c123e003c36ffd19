// The I/O engine's core; see engine.h for how a request is read.
#include "engine.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "uring.h"

namespace sllm_io {

namespace {

// The most one pread is asked for (Linux caps a single read a little under 2 GiB); a multiple of
// kAlignment so a direct read stays aligned.
constexpr std::int64_t kMaxIo = std::int64_t{1} << 30;

// strerror_r comes in two flavours (GNU returns the text, XSI fills the buffer); take either.
[[maybe_unused]] std::string pick_error_text(int rc, const char* buf, int err) {
  return rc == 0 ? std::string(buf) : "Unknown error " + std::to_string(err);
}
[[maybe_unused]] std::string pick_error_text(const char* text, const char*, int) {
  return std::string(text);
}

bool is_stream(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode));
}

int open_retrying(const std::string& path, int flags) {
  for (;;) {
    int fd = ::open(path.c_str(), flags | O_RDONLY | O_CLOEXEC);
    if (fd >= 0 || errno != EINTR) return fd;
  }
}

}  // namespace

std::string describe(int err) {
  char buf[256] = {0};
  return pick_error_text(strerror_r(err, buf, sizeof buf), buf, err);
}

Engine::Engine(int threads, bool direct, Backend backend) : threads_(threads), direct_(direct) {
  if (threads < 1 || threads > kMaxThreads) {
    throw std::invalid_argument("threads must be between 1 and " + std::to_string(kMaxThreads) +
                                ", got " + std::to_string(threads));
  }
  if (backend != Backend::kThreads) {
    int err = 0;
    // Room for every piece in flight, the wake-up poll, and slack.
    ring_ = Ring::open(2 * kQueueDepth, &err);
    if (ring_) {
      wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (wake_fd_ < 0) {
        err = errno;
        ring_.reset();
      }
    }
    if (!ring_ && backend == Backend::kIoUring) throw BackendUnavailable(describe(err));
  }
  backend_ = ring_ ? Backend::kIoUring : Backend::kThreads;
  const int workers = ring_ ? 1 : threads;
  workers_.reserve(static_cast<std::size_t>(workers));
  try {
    for (int i = 0; i < workers; ++i) {
      if (ring_) {
        workers_.emplace_back([this] { serve_ring(); });
      } else {
        workers_.emplace_back([this] { work(); });
      }
    }
  } catch (...) {  // could not start them all: stop those that did start
    close();
    throw;
  }
}

Engine::~Engine() { close(); }

std::int64_t Engine::submit(const std::string& path, std::int64_t file_offset,
                            std::int64_t nbytes, void* dest) {
  if (file_offset < 0 || nbytes < 0 || (nbytes > 0 && dest == nullptr)) {
    throw std::invalid_argument(path + ": bad read request (offset " +
                                std::to_string(file_offset) + ", " + std::to_string(nbytes) +
                                " bytes)");
  }
  auto req = std::make_shared<Request>();
  req->path = path;
  req->offset = file_offset;
  req->nbytes = nbytes;
  req->dest = static_cast<char*>(dest);
  std::int64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) throw EngineClosed();
    ticket = next_ticket_++;
    requests_.emplace(ticket, req);
    // Woken under the lock: close() closes the eventfd only after it has set closing_. When the
    // queue was not empty, an earlier submit has woken the ring's thread already.
    if (backend_ == Backend::kIoUring && queue_.empty()) wake();
    queue_.push_back(std::move(req));
  }
  if (backend_ == Backend::kThreads) work_cv_.notify_one();
  return ticket;
}

std::int64_t Engine::wait(std::int64_t ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = requests_.find(ticket);
  if (it == requests_.end()) throw UnknownTicket(ticket);
  std::shared_ptr<Request> req = std::move(it->second);
  requests_.erase(it);
  done_cv_.wait(lock, [&] { return req->done; });
  if (req->failure) throw *req->failure;
  return req->nbytes;
}

void Engine::close() {
  std::lock_guard<std::mutex> close_lock(close_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
  }
  work_cv_.notify_all();
  if (wake_fd_ >= 0) wake();
  for (std::thread& t : workers_) t.join();  // they drain the queue before leaving
  workers_.clear();
  ring_.reset();  // nothing is in flight: its thread left only once every piece had completed
  if (wake_fd_ >= 0) {
    ::close(wake_fd_);
    wake_fd_ = -1;
  }

  std::lock_guard<std::mutex> files_lock(files_mu_);
  for (auto& entry : files_) {
    if (entry.second->direct_fd >= 0) ::close(entry.second->direct_fd);
    if (entry.second->buffered_fd >= 0) ::close(entry.second->buffered_fd);
  }
  files_.clear();
}

std::uint64_t Engine::direct_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return direct_bytes_;
}

std::uint64_t Engine::buffered_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return buffered_bytes_;
}

void Engine::work() {
  for (;;) {
    std::shared_ptr<Request> req;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return closing_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closing, and nothing left to read
      req = std::move(queue_.front());
      queue_.pop_front();
    }
    // No exception may leave a worker (it would end the process): each becomes the request's.
    try {
      read(*req);
    } catch (const ReadFailure& e) {
      req->failure = std::make_unique<ReadFailure>(e);
    } catch (const std::exception& e) {
      req->failure = std::make_unique<ReadFailure>(
          EIO, req->path + ": cannot read at offset " + std::to_string(req->offset) + ": " +
                   e.what(), req->path, req->offset);
    } catch (...) {
      req->failure = std::make_unique<ReadFailure>(
          EIO, req->path + ": cannot read at offset " + std::to_string(req->offset),
          req->path, req->offset);
    }
    finish(*req);
  }
}

void Engine::finish(Request& req) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    req.done = true;
    direct_bytes_ += static_cast<std::uint64_t>(req.direct_read);
    buffered_bytes_ += static_cast<std::uint64_t>(req.buffered_read);
  }
  done_cv_.notify_all();
}

void Engine::read(Request& req) {
  const std::string& path = req.path;
  if (req.nbytes == 0) {  // nothing to read, but the file must be there (as in the twin)
    descriptor(file(path), path, false, req.offset);
    return;
  }
  std::int64_t done = 0;
  while (done < req.nbytes) {
    const std::int64_t at = req.offset + done;
    char* to = req.dest + done;
    const std::int64_t left = req.nbytes - done;

    int fd = -1;
    std::int64_t want = left;
    if (direct_ && left >= kAlignment && aligned(static_cast<std::uint64_t>(at)) &&
        aligned(reinterpret_cast<std::uintptr_t>(to))) {
      fd = descriptor(file(path), path, true, req.offset);  // -1: O_DIRECT refused
      want = left / kAlignment * kAlignment;  // whole blocks only: never write past the request
    }
    const bool via_direct = fd >= 0;
    if (!via_direct) {
      fd = descriptor(file(path), path, false, req.offset);
      want = left;
    }

    const ssize_t n = ::pread(fd, to, static_cast<std::size_t>(std::min(want, kMaxIo)), at);
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (via_direct && err == EINVAL) {  // opened, but direct reads are refused here
        refuse_direct(file(path));
        continue;
      }
      throw ReadFailure(err, path + ": cannot read at offset " + std::to_string(at) + ": " +
                                 describe(err), path, at);
    }
    if (n == 0) {
      throw ReadFailure(EIO, path + ": short read: file ended at offset " + std::to_string(at) +
                                 ", expected " + std::to_string(req.offset + req.nbytes),
                        path, at);
    }
    done += n;
    (via_direct ? req.direct_read : req.buffered_read) += n;
  }
}

Engine::File& Engine::file(const std::string& path) {
  std::lock_guard<std::mutex> lock(files_mu_);
  std::unique_ptr<File>& slot = files_[path];
  if (!slot) slot = std::make_unique<File>();
  return *slot;  // stable: files_ holds it until close(), after the workers are gone
}

// A descriptor for the file: direct or buffered, opened on first use. For direct, -1 when the
// filesystem refuses O_DIRECT. Throws ReadFailure when the file cannot be opened.
int Engine::descriptor(File& f, const std::string& path, bool direct, std::int64_t offset) {
  std::lock_guard<std::mutex> lock(files_mu_);
  if (direct) {
    if (f.direct_refused) return -1;
    if (f.direct_fd >= 0) return f.direct_fd;
    const int fd = open_retrying(path, O_DIRECT);
    if (fd >= 0) {
      f.stream = f.stream || is_stream(fd);
      return f.direct_fd = fd;
    }
    if (errno != EINVAL) {
      const int err = errno;
      throw ReadFailure(err, path + ": cannot open: " + describe(err), path, offset);
    }
    f.direct_refused = true;  // tmpfs and some other filesystems
    return -1;
  }
  if (f.buffered_fd >= 0) return f.buffered_fd;
  const int fd = open_retrying(path, 0);
  if (fd < 0) {
    const int err = errno;
    throw ReadFailure(err, path + ": cannot open: " + describe(err), path, offset);
  }
  f.stream = f.stream || is_stream(fd);
  return f.buffered_fd = fd;
}

bool Engine::is_stream_file(File& f) {
  std::lock_guard<std::mutex> lock(files_mu_);
  return f.stream;
}

void Engine::refuse_direct(File& f) {
  std::lock_guard<std::mutex> lock(files_mu_);
  f.direct_refused = true;  // its descriptor stays open (another worker may be using it)
}

}  // namespace sllm_io
