// The CPU ops' helper threads (torch-free): persistent threads woken through a futex, for the hundreds of
// small ops of a decode pass.
//
// Why not torch's inter-op pool (at::launch): a task posted there started on its thread 44-73 us later on
// average on the 2-core VM (up to 1.4 ms; a probe posting after 0.2-2 ms of other work), as long as a whole
// Mamba scan or small linear takes, so a second thread rarely got a share. A helper here stays awake for
// kPoolSpinNs after each task (yielding to any other thread that wants its core) and then sleeps on a futex:
// in a pass, where ops follow each other within a millisecond, it picks an offer up in ~6-13 us instead of
// the ~60 us a sleeping one took to wake on that VM (re-measured later on a quieter VM, from the offer to a helper's
// start over ~6000 back-to-back linears: 0.8 us on average). Why not OpenMP: its regions end in a barrier that waits
// for every team thread (docs/threads.md). A task is only ever offered: the caller works through it too and
// never waits for a helper that has not claimed a part of it (parallel_cpu.h), so a helper that is
// descheduled, busy with another caller's task or slow to wake costs nothing but its own share.
#pragma once
#include <cstdint>
#include <memory>

namespace tt {

// How long an idle helper stays awake: longer than the gaps between the ops of a decode pass (the torch ops
// between two of ours), short enough that an idle process gives its cores back at once. Measured on the
// width-1/8 denoiser pass at 2 threads: 0 (always asleep) 55-59 ms bf16, 1 ms 47-54 ms.
constexpr int64_t kPoolSpinNs = 1000000;

// Work that any number of threads may run at the same time, each claiming parts until none is left.
struct PoolTask {
  virtual ~PoolTask() = default;
  virtual void work() = 0;
};

// Offers `task` to `helpers` pool threads (started on first use; a newer offer replaces this one for the
// helpers that have not taken it yet) and returns at once.
void pool_offer(std::shared_ptr<PoolTask> task, int64_t helpers);

// Whether the calling thread is running a part of a parallel task (a pool helper, or a caller inside a
// PoolTaskScope): nested parallel work then runs inline.
bool pool_in_task();

// Marks the calling thread as running a task while it lives (the caller's side of an offer).
struct PoolTaskScope {
  PoolTaskScope();
  ~PoolTaskScope();
  PoolTaskScope(const PoolTaskScope&) = delete;
  PoolTaskScope& operator=(const PoolTaskScope&) = delete;
  bool outer;
};

}  // namespace tt
