// A minimal io_uring wrapper on the raw system calls (no liburing): one submission and one
// completion ring, mapped into memory, driven by a single thread.
//
// The rings are shared with the kernel: we own the SQ tail and the CQ head, the kernel the SQ head
// and the CQ tail. We load the kernel's indices with acquire and publish ours with release, so an
// entry's contents are visible before the index that hands it over.
//
// Built only where <linux/io_uring.h> exists (SLLM_HAVE_IO_URING); elsewhere Ring::open always
// fails with ENOSYS and the engine keeps to its thread pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#define SLLM_HAVE_IO_URING 1
#endif
#endif

namespace sllm_io {

class Ring {
 public:
  // A ring with room for `entries` submissions (a power of two), checked to work: the kernel must
  // offer IORING_OP_READ and IORING_OP_POLL_ADD, and one no-op must go round. nullptr when not,
  // with *err set (ENOSYS: no io_uring here; EPERM: refused, by seccomp or io_uring_disabled).
  static std::unique_ptr<Ring> open(unsigned entries, int* err);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Queue a read of len bytes at offset of fd into dest; false when the submission ring is full.
  bool read(int fd, void* dest, unsigned len, std::uint64_t offset, std::uint64_t user_data);
  // Queue a one-shot poll for POLLIN on fd; false when the submission ring is full.
  bool poll_in(int fd, std::uint64_t user_data);

  // Hands the queued entries to the kernel and, with wait, blocks until at least one completion
  // is there. Returns 0 or an errno (EINTR is retried here).
  int submit(bool wait);

  // Calls f(user_data, res) for each completion there now, oldest first; returns how many.
  template <typename F>
  unsigned reap(F&& f) {
    unsigned n = 0;
    std::uint64_t user_data;
    std::int32_t res;
    while (next_completion(&user_data, &res)) {
      f(user_data, res);
      ++n;
    }
    return n;
  }

 private:
  Ring() = default;
  bool next_completion(std::uint64_t* user_data, std::int32_t* res);
  void* next_entry();

  int fd_ = -1;
  void* sq_map_ = nullptr;
  std::size_t sq_map_size_ = 0;
  void* cq_map_ = nullptr;  // the same mapping as sq_map_ with IORING_FEAT_SINGLE_MMAP
  std::size_t cq_map_size_ = 0;
  void* sqes_ = nullptr;
  std::size_t sqes_size_ = 0;

  unsigned* sq_head_ = nullptr;  // the kernel's
  unsigned* sq_tail_ = nullptr;  // ours
  unsigned sq_mask_ = 0;
  unsigned sq_entries_ = 0;
  unsigned sq_local_tail_ = 0;  // entries filled in, not yet published

  unsigned* cq_head_ = nullptr;  // ours
  unsigned* cq_tail_ = nullptr;  // the kernel's
  unsigned cq_mask_ = 0;
  void* cqes_ = nullptr;
};

}  // namespace sllm_io
