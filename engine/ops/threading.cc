#include "engine/ops/threading.h"

#include <atomic>
#include <thread>

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

}  // namespace

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
  if (omp_in_parallel()) {
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
  int spins = 0;
  while (generation_.load(std::memory_order_acquire) == gen) {
    if (++spins < kSpinsBeforeYield) {
#if defined(__SSE2__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace ops
}  // namespace moemesh
