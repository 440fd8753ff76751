#include "engine/ops/threading.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moemesh {
namespace ops {
namespace {

std::atomic<int> g_num_threads{0};  // 0: OpenMP's default.

// _mm_pause takes ~30 ns on the dev VM's Zen 5: spin ~60 us, then yield the CPU so that an
// oversubscribed machine (another process on our cores) still makes progress.
constexpr int kSpinsBeforeYield = 2048;

thread_local bool t_in_region = false;

// Pause iterations a pool worker spins before sleeping (~50 us at ~25 ns each).
constexpr int kWorkerSpins = 2048;

inline void CpuPause() {
#if defined(__SSE2__)
  _mm_pause();
#endif
}

// Waits until done(): spins kSpinsBeforeYield pauses, then yields the CPU between checks.
template <typename Done>
void SpinThenYieldUntil(Done done) {
  int spins = 0;
  while (!done()) {
    if (++spins < kSpinsBeforeYield) {
      CpuPause();
    } else {
      std::this_thread::yield();
    }
  }
}

// The process-wide pool behind ParallelRun. One region at a time (run_mu_); workers are made
// on first need and live until exit. A region offers part t to worker t (its slot: function,
// thread count, state kOffered) and bumps the worker's ticket to wake it. A worker takes the
// offer by moving the state kOffered -> kTaken; the caller, once done with part 0, revokes
// every offer not yet taken (kOffered -> kRevoked) and runs those parts itself. So a region
// never waits for a worker that has not started (descheduled by a busy machine, or still
// waking up): it waits only for parts that are running. A slot is rewritten only after the
// previous region has ended, and every part runs exactly once.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool();  // never destroyed: detached workers outlive exit's destructors
    return *pool;
  }

  void Run(int nt, const std::function<void(int, int)>& fn) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (!run.owns_lock()) {  // another thread's region holds the pool
      RunAlone(fn);
      return;
    }
    while (static_cast<int>(workers_.size()) < nt - 1) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      const int index = static_cast<int>(workers_.size());
      std::thread([this, w, index] { WorkerLoop(w, index); }).detach();
    }
    for (int i = 1; i < nt; ++i) {
      Worker& w = *workers_[i - 1];
      w.fn = &fn;
      w.nt = nt;
      w.state.store(kOffered, std::memory_order_release);
      w.ticket.fetch_add(1, std::memory_order_seq_cst);
      if (w.sleeping.load(std::memory_order_seq_cst)) {
        { std::lock_guard<std::mutex> l(w.mu); }
        w.cv.notify_one();
      }
    }
    const bool outer = t_in_region;
    t_in_region = true;
    fn(0, nt);
    for (int i = 1; i < nt; ++i) {
      int offered = kOffered;
      if (workers_[i - 1]->state.compare_exchange_strong(offered, kRevoked,
                                                         std::memory_order_acq_rel)) {
        fn(i, nt);  // the worker has not started: its part runs here
      }
    }
    t_in_region = outer;
    SpinThenYieldUntil([&] { return running_.load(std::memory_order_acquire) <= 0; });
  }

  static void RunAlone(const std::function<void(int, int)>& fn) {
    const bool outer = t_in_region;
    t_in_region = true;
    fn(0, 1);
    t_in_region = outer;
  }

 private:
  static constexpr int kIdle = 0, kOffered = 1, kTaken = 2, kRevoked = 3;

  struct Worker {
    std::atomic<uint64_t> ticket{0};
    std::atomic<int> state{kIdle};
    std::atomic<bool> sleeping{false};
    const std::function<void(int, int)>* fn = nullptr;  // valid while state is kOffered/kTaken
    int nt = 1;
    std::mutex mu;
    std::condition_variable cv;
  };

  void WorkerLoop(Worker* w, int index) {
    t_in_region = true;  // kernels a worker runs stay on it
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    uint64_t seen = 0;
    while (true) {
      int spins = 0;
      while (w->ticket.load(std::memory_order_acquire) == seen && ++spins < kWorkerSpins) {
        CpuPause();
      }
      if (w->ticket.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> l(w->mu);
        w->sleeping.store(true, std::memory_order_seq_cst);
        w->cv.wait(l, [&] { return w->ticket.load(std::memory_order_seq_cst) != seen; });
        w->sleeping.store(false, std::memory_order_relaxed);
      }
      seen = w->ticket.load(std::memory_order_acquire);
      // running_ goes up before the offer is taken, so the caller cannot see 0 in between.
      running_.fetch_add(1, std::memory_order_acq_rel);
      int offered = kOffered;
      if (w->state.compare_exchange_strong(offered, kTaken, std::memory_order_acq_rel)) {
        (*w->fn)(index, w->nt);
        w->state.store(kIdle, std::memory_order_release);
      }
      running_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex run_mu_;
  std::vector<std::unique_ptr<Worker>> workers_;
  // Workers between waking and finishing (never reset: a late worker of an earlier region
  // may still be between its increment and decrement when the next region starts).
  alignas(64) std::atomic<int> running_{0};
};

}  // namespace

bool InParallelRegion() { return t_in_region; }

void ParallelRun(int threads, const std::function<void(int t, int nt)>& fn) {
  const int nt = std::min(threads, InParallelRegion() ? 1 : NumThreads());
  if (nt <= 1) {  // the caller's own kernels keep their threading
    fn(0, 1);
    return;
  }
  Pool::Get().Run(nt, fn);
}

void ParallelForDynamic(int threads, int64_t n, const std::function<void(int64_t i)>& fn) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  ParallelRun(static_cast<int>(std::min<int64_t>(threads, n)), [&](int, int) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(i);
    }
  });
}

void SetNumThreads(int n) {
  if (n <= 0) return;
  g_num_threads.store(n, std::memory_order_relaxed);
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
}

int NumThreads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int SyncThreads() {
#ifdef _OPENMP
  if (t_in_region || omp_in_parallel()) {
    if (omp_get_max_threads() != 1) omp_set_num_threads(1);  // Affects this task only.
    return 1;
  }
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n <= 0) return omp_get_max_threads();
  if (omp_get_max_threads() != n) omp_set_num_threads(n);
  return n;
#else
  return 1;
#endif
}

void SpinBarrier::Wait() {
  if (num_threads_ <= 1) return;
  const uint32_t gen = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == num_threads_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.store(gen + 1, std::memory_order_release);
    return;
  }
  SpinThenYieldUntil([&] { return generation_.load(std::memory_order_acquire) != gen; });
}

}  // namespace ops
}  // namespace moemesh
