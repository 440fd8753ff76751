// Thread-count control shared by oneDNN and our kernels, and the worker pool they split work on.
#ifndef MOEMESH_ENGINE_OPS_THREADING_H_
#define MOEMESH_ENGINE_OPS_THREADING_H_

#include <atomic>
#include <cstdint>
#include <functional>

namespace moemesh {
namespace ops {

// Sets the thread count used by oneDNN and our kernels (the pool and OpenMP's default). 0 =
// leave default.
void SetNumThreads(int n);
// The thread count our kernels use when called outside a parallel region.
int NumThreads();

// The number of threads a kernel called from the current thread should use: 1 inside a
// ParallelRun region or an OpenMP parallel region (nested parallelism is off), NumThreads()
// otherwise. Also makes
// the calling thread's OpenMP default team size equal to that number, since oneDNN reads it.
int SyncThreads();

// Runs fn(t, nt) for t = 0..nt-1 on nt = min(threads, NumThreads()) threads: the caller runs
// t = 0, workers of one process-wide pool the rest; returns when all have returned. Pool
// workers spin ~50 us for the next region and then sleep (an idle pool costs no CPU, unlike
// libgomp's workers, which spin for milliseconds between regions and so take a core from
// every other thread and process on a 2-core machine). A call from inside a region, or while
// another thread's region holds the pool, runs fn(0, 1) on the caller. Inside fn of a region
// of several threads, SyncThreads() is 1 (nested kernels stay on their thread); with threads
// <= 1, fn(0, 1) is a plain call.
void ParallelRun(int threads, const std::function<void(int t, int nt)>& fn);

// Runs fn(i) for i in [0, n) over ParallelRun's threads, handing out indices one at a time
// (dynamic scheduling: for items of uneven cost).
void ParallelForDynamic(int threads, int64_t n, const std::function<void(int64_t i)>& fn);

// True inside ParallelRun's fn (any thread) and on pool workers.
bool InParallelRegion();

// Threads worth using for `work` multiply-adds (or comparable units) given `max_threads`:
// small jobs run on the calling thread, since waking the pool costs about a microsecond.
inline int ThreadsFor(int64_t work, int max_threads, int64_t min_work_per_thread) {
  if (max_threads <= 1 || work < 2 * min_work_per_thread) return 1;
  int64_t n = work / min_work_per_thread;
  return n < max_threads ? static_cast<int>(n) : max_threads;
}

// Barrier for a fixed team of threads (e.g. those of one OpenMP parallel region spanning a
// whole decode step), spinning instead of sleeping: ~0.1 us per crossing on two cores, where
// an OpenMP fork/join or `omp barrier` costs microseconds. Waiters yield the CPU after
// spinning a while, so an oversubscribed machine still makes progress.
class SpinBarrier {
 public:
  explicit SpinBarrier(int num_threads) : num_threads_(num_threads) {}
  SpinBarrier(const SpinBarrier&) = delete;
  SpinBarrier& operator=(const SpinBarrier&) = delete;

  void Wait();

 private:
  const int num_threads_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
};

}  // namespace ops
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_OPS_THREADING_H_
