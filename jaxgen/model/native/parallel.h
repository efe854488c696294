// ParallelFor for jaxgen's native CPU kernels (products.cc, attention.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxgen_native {

// Runs body(chunk) for chunk in [0, chunks) on the caller and XLA's intra-op threads. The caller
// claims chunks too and waits only for chunks other threads have claimed, so a pool that runs
// tasks late (or on the caller) never deadlocks.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks) - 1;
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const Body* shared_body = &body;
  // A helper that starts after the caller returned finds no chunk left and touches only `state`
  // (which it co-owns): the caller waits for every claimed chunk before `body` goes away.
  auto work = [state, chunks, shared_body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      (*shared_body)(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace jaxgen_native
