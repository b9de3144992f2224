// The CPU ops' helper threads: one offer slot, a generation counter the helpers watch (awake for a while, then
// asleep in std::atomic::wait: a futex on a 32-bit word) and threads started on demand. See worker_pool_cpu.h.
#include "common/worker_pool_cpu.h"

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TT_POOL_PAUSE() _mm_pause()
#else
#define TT_POOL_PAUSE() ((void)0)
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define TT_POOL_ATFORK 1
#endif

namespace tt {
namespace {

thread_local bool t_in_task = false;

struct Pool {
  std::mutex lock;                      // guards task, helpers and started
  std::shared_ptr<PoolTask> task;       // the latest offer
  int64_t helpers = 0;                  // how many helpers it asked for: helper i takes it if i < helpers
  int64_t started = 0;
  std::atomic<uint32_t> generation{0};  // bumped by every offer
};

// Leaked on purpose: the helpers are detached and may still be waiting on it while statics are destroyed at
// exit. A forked child gets a new one (its parent's helpers do not exist there).
Pool* g_pool = new Pool;

void helper_loop(Pool* pool, int64_t index) {
  t_in_task = true;
  uint32_t seen = 0;
  for (;;) {
    // Awake for kPoolSpinNs first, yielding to any other thread that wants this core, then asleep.
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 1; pool->generation.load(std::memory_order_acquire) == seen; ++spins) {
      TT_POOL_PAUSE();
      if (spins % 64 != 0) continue;
      if (std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(kPoolSpinNs)) break;
      std::this_thread::yield();
    }
    pool->generation.wait(seen, std::memory_order_acquire);   // returns once the generation differs from seen
    std::shared_ptr<PoolTask> task;
    {
      std::lock_guard<std::mutex> g(pool->lock);
      seen = pool->generation.load(std::memory_order_relaxed);
      if (index < pool->helpers) task = pool->task;
    }
    if (task) task->work();
  }
}

#if defined(TT_POOL_ATFORK)
void reset_in_child() { g_pool = new Pool; }
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, &reset_in_child);
#endif

}  // namespace

void pool_offer(std::shared_ptr<PoolTask> task, int64_t helpers) {
  if (helpers <= 0) return;
  Pool* pool = g_pool;
  {
    std::lock_guard<std::mutex> g(pool->lock);
    for (; pool->started < helpers; ++pool->started) std::thread(helper_loop, pool, pool->started).detach();
    pool->task = std::move(task);
    pool->helpers = helpers;
    pool->generation.fetch_add(1, std::memory_order_release);
  }
  pool->generation.notify_all();
}

bool pool_in_task() { return t_in_task; }

PoolTaskScope::PoolTaskScope() : outer(!t_in_task) { t_in_task = true; }
PoolTaskScope::~PoolTaskScope() {
  if (outer) t_in_task = false;
}

}  // namespace tt
