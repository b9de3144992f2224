// Splitting a CPU op's work over threads so that it degrades gracefully on a busy machine, for the CPU
// adapters (csrc/<op>/<op>_torch.cpp).
//
// Why not at::parallel_for: a decode pass runs hundreds of ops of tens to hundreds of microseconds, each an
// OpenMP fork/join. When another process holds a core, the worker thread is often descheduled, and the
// caller then waits at the join for it (static split: for its whole half of the work; any split: at least
// for it to arrive), a scheduler tick or more per op. Measured on the loaded 2-core machine, 2 threads:
// a 300 us Mamba block scan took 15-20 ms (docs/threads.md).
//
// Here the caller offers the work to the pool's helpers (worker_pool_cpu.h) and starts on it itself; everyone
// claims chunks from one shared counter, and the caller waits only for chunks a helper has claimed and not yet
// finished. A helper that starts late finds nothing left and returns without touching the work, so a
// descheduled thread costs at most the chunk it holds, and on a quiet machine the helpers join within
// microseconds. Work too small to amortise a hand-off runs inline.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "common/worker_pool_cpu.h"

namespace tt {

// Below this many elements of work per thread (~50-150 us for these kernels) a second thread does not pay.
constexpr int64_t kParallelMinWork = int64_t(1) << 18;

struct ChunkQueue final : PoolTask {
  std::atomic<int64_t> next{0}, finished{0};
  int64_t items = 0, chunk = 1;
  const std::function<void(int64_t, int64_t)>* fn = nullptr;  // valid while finished < items
  std::mutex error_lock;
  std::exception_ptr error;

  // Claim and run chunks until none is left.
  void work() override {
    for (int64_t b; (b = next.fetch_add(chunk)) < items;) {
      const int64_t e = std::min(items, b + chunk);
      try {
        (*fn)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> g(error_lock);
        if (!error) error = std::current_exception();
      }
      finished.fetch_add(e - b);  // last touch of fn by this chunk
    }
  }
};

// fn(begin, end) over [0, items), where one item touches about `work_per_item` elements: inline when the
// total is under 2 * kParallelMinWork (or inside a parallel region), else the caller and up to
// at::get_num_threads() - 1 helpers claim chunks of >= kParallelMinWork / 4 elements. The first exception
// thrown by fn is rethrown here after every claimed chunk has finished.
template <typename F>
void parallel_chunks(int64_t items, int64_t work_per_item, F&& fn) {
  if (items <= 0) return;
  const int64_t work = std::max<int64_t>(1, work_per_item);
  const int64_t threads = std::min<int64_t>({int64_t(at::get_num_threads()), items, items * work / kParallelMinWork});
  if (threads <= 1 || at::in_parallel_region() || pool_in_task()) {
    fn(int64_t(0), items);
    return;
  }
  const std::function<void(int64_t, int64_t)> body(std::ref(fn));
  auto q = std::make_shared<ChunkQueue>();
  q->items = items;
  q->chunk = std::min(std::max<int64_t>(1, kParallelMinWork / 4 / work), (items + threads - 1) / threads);
  q->fn = &body;
  pool_offer(q, threads - 1);
  {
    PoolTaskScope scope;
    q->work();
  }
  while (q->finished.load() < items) std::this_thread::yield();  // only chunks a helper is running now
  if (q->error) std::rethrow_exception(q->error);
}

}  // namespace tt
