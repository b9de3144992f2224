// Per-call scratch of the CPU ops without a per-call allocation: a per-thread buffer, one per (T, Tag) (each call
// site names its own Tag), that keeps its size across calls up to kKeepBytes; a larger request (a long prompt) gets a
// buffer for that call only, so one big call does not pin memory for the thread's lifetime. Hand data() to helper
// threads as a pointer: the thread_local is per thread.
#pragma once
#include <cstddef>
#include <vector>

namespace tt {

constexpr size_t kScratchKeepBytes = size_t(16) << 20;

template <typename T, typename Tag>
class CallScratch {
 public:
  explicit CallScratch(size_t n) {
    thread_local std::vector<T> kept;
    std::vector<T>& buf = n * sizeof(T) <= kScratchKeepBytes ? kept : once_;
    if (buf.size() < n) buf.resize(n);
    data_ = buf.data();
  }
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;
  T* data() const { return data_; }

 private:
  std::vector<T> once_;
  T* data_ = nullptr;
};

}  // namespace tt
