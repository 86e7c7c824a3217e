// moa/reusable.hpp - buffers a const method keeps from call to call.
//
// A layer's inference (infer) is const, so that a const layer serves several threads, and so it
// made its buffers anew on every call: megabytes that the system hands out as fresh pages, each
// faulted in on first write. At the base shape a repeated inference forward spent 15% of its time
// in the kernel doing that (23.0 -> 19.7 ms with the buffers kept; perf, one thread). Reusable
// keeps one set: the first caller leases it, and a caller that finds it leased (another thread
// mid-call) gets a fresh set of its own, as before. Copies and moves of a layer start empty.
#pragma once

#include <memory>
#include <mutex>

namespace moa::detail {

template <typename Buffers>
class Reusable {
 public:
  Reusable() = default;
  Reusable(const Reusable&) {}
  Reusable& operator=(const Reusable&) { return *this; }

  // The kept buffers while the lease lives, or fresh ones when they are leased already.
  class Lease {
   public:
    explicit Lease(const Reusable& owner) : lock_(owner.mutex_, std::try_to_lock) {
      if (!lock_.owns_lock()) fresh_ = std::make_unique<Buffers>();
      buffers_ = lock_.owns_lock() ? &owner.buffers_ : fresh_.get();
    }
    Buffers& operator*() const { return *buffers_; }
    Buffers* operator->() const { return buffers_; }
    bool reused() const { return lock_.owns_lock(); }

   private:
    std::unique_lock<std::mutex> lock_;
    std::unique_ptr<Buffers> fresh_;
    Buffers* buffers_ = nullptr;
  };

  Lease lease() const { return Lease(*this); }

 private:
  mutable std::mutex mutex_;
  mutable Buffers buffers_;
};

}  // namespace moa::detail
