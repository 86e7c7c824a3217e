// moa/thread_pool.hpp - a small fixed pool of threads for moa's own parallel loops.
//
// run(parts, task) calls task(part, thread) once for every part in [0, parts), spread over the
// pool's threads (the caller is thread 0). Parts are handed out dynamically, but a part's result
// must not depend on which thread runs it (`thread` only selects per-thread scratch), so results
// are the same whatever the timing: the thread count decides how work is split, never the values.
// A call made while the pool is already running (from a task, or from a second thread sharing
// the pool) runs its parts inline, one after another, with the same split and the same results.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moa {

class ThreadPool {
 public:
  explicit ThreadPool(int threads = 1) : threads_(threads) {
    MOA_CHECK(threads >= 1, "ThreadPool", "threads must be at least 1, got ", threads);
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }

  int size() const { return threads_; }

  template <typename Task>
  void run(Index parts, Task&& task) {
    if (parts <= 0) return;
    bool idle = false;
    if (threads_ == 1 || parts == 1 || !busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) {
      for (Index part = 0; part < parts; ++part) task(part, 0);
      return;
    }
    std::function<void(Index, int)> job = std::ref(task);
    task_ = &job;
    parts_ = parts;
    next_part_.store(0, std::memory_order_relaxed);
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    error_ = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    take_parts(0);
    while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    task_ = nullptr;
    std::exception_ptr error = error_;
    busy_.store(false, std::memory_order_release);
    if (error) std::rethrow_exception(error);
  }

 private:
  void take_parts(int thread) {
    for (Index part = next_part_.fetch_add(1); part < parts_; part = next_part_.fetch_add(1)) {
      try {
        (*task_)(part, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void work(int thread) {
    unsigned seen = 0;
    for (;;) {
      // Spin a little before sleeping: a layer issues many short parallel calls back to back.
      unsigned current = generation_.load(std::memory_order_acquire);
      for (int spin = 0; current == seen && spin < 20000; ++spin) {
        std::this_thread::yield();
        current = generation_.load(std::memory_order_acquire);
      }
      if (current == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        current = generation_.load(std::memory_order_acquire);
      }
      seen = current;
      if (stopping_) return;
      take_parts(thread);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::atomic<bool> busy_{false};
  std::atomic<unsigned> generation_{0};
  std::atomic<Index> next_part_{0};
  std::atomic<int> pending_{0};
  std::function<void(Index, int)>* task_ = nullptr;
  Index parts_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::mutex mutex_, error_mutex_;
  std::condition_variable wake_;
};

}  // namespace moa
