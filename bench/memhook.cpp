// Heap accounting for dattn-bench: malloc and friends are replaced by thin wrappers around
// glibc's own allocator (__libc_malloc, ...) that keep a count of the bytes live and their
// high-water mark. Linked into dattn-bench, and built as libdattn_memhook.so for the Python
// peers (LD_PRELOAD), so both sides are measured the same way: every allocation that goes
// through malloc (operator new, std::aligned_alloc, OpenMP runtime scratch, PyTorch's CPU
// allocator) is seen; memory mapped directly with mmap and thread stacks are not.
//
// The counters are exported with C linkage:
//   dattn_memhook_live()       bytes live now (usable sizes, as malloc_usable_size reports)
//   dattn_memhook_reset_peak() sets the high-water mark to the bytes live now
//   dattn_memhook_peak()       the high-water mark since the last reset
//   dattn_memhook_active()     1 (lets a caller check that the hook is the malloc in use)
#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>

extern "C" {
void* __libc_malloc(std::size_t size);
void __libc_free(void* ptr);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* ptr, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);
void* __libc_valloc(std::size_t size);
void* __libc_pvalloc(std::size_t size);
}

namespace {

std::atomic<std::int64_t> g_live{0};
std::atomic<std::int64_t> g_peak{0};

inline void note_alloc(void* ptr) {
  if (ptr == nullptr) return;
  const std::int64_t bytes = std::int64_t(malloc_usable_size(ptr));
  const std::int64_t now = g_live.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  std::int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

inline void note_free(void* ptr) {
  if (ptr == nullptr) return;
  g_live.fetch_sub(std::int64_t(malloc_usable_size(ptr)), std::memory_order_relaxed);
}

bool power_of_two(std::size_t x) { return x != 0 && (x & (x - 1)) == 0; }

}  // namespace

extern "C" {

__attribute__((visibility("default"))) std::int64_t dattn_memhook_live() {
  return g_live.load(std::memory_order_relaxed);
}
__attribute__((visibility("default"))) std::int64_t dattn_memhook_peak() {
  return g_peak.load(std::memory_order_relaxed);
}
__attribute__((visibility("default"))) void dattn_memhook_reset_peak() {
  g_peak.store(g_live.load(std::memory_order_relaxed), std::memory_order_relaxed);
}
__attribute__((visibility("default"))) int dattn_memhook_active() { return 1; }

__attribute__((visibility("default"))) void* malloc(std::size_t size) {
  void* p = __libc_malloc(size);
  note_alloc(p);
  return p;
}

__attribute__((visibility("default"))) void free(void* ptr) {
  note_free(ptr);
  __libc_free(ptr);
}

__attribute__((visibility("default"))) void* calloc(std::size_t count, std::size_t size) {
  void* p = __libc_calloc(count, size);
  note_alloc(p);
  return p;
}

__attribute__((visibility("default"))) void* realloc(void* ptr, std::size_t size) {
  // On failure the old block stays valid, so only account once the call has succeeded.
  const std::int64_t old_bytes = ptr ? std::int64_t(malloc_usable_size(ptr)) : 0;
  void* p = __libc_realloc(ptr, size);
  if (p == nullptr && size != 0) return nullptr;
  g_live.fetch_sub(old_bytes, std::memory_order_relaxed);
  note_alloc(p);
  return p;
}

__attribute__((visibility("default"))) void* reallocarray(void* ptr, std::size_t count,
                                                          std::size_t size) {
  std::size_t bytes = 0;
  if (__builtin_mul_overflow(count, size, &bytes)) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(ptr, bytes);
}

__attribute__((visibility("default"))) void* memalign(std::size_t alignment, std::size_t size) {
  void* p = __libc_memalign(alignment, size);
  note_alloc(p);
  return p;
}

__attribute__((visibility("default"))) void* aligned_alloc(std::size_t alignment, std::size_t size) {
  void* p = __libc_memalign(alignment, size);
  note_alloc(p);
  return p;
}

__attribute__((visibility("default"))) int posix_memalign(void** out, std::size_t alignment,
                                                          std::size_t size) {
  if (!power_of_two(alignment) || alignment % sizeof(void*) != 0) return EINVAL;
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr) return ENOMEM;
  note_alloc(p);
  *out = p;
  return 0;
}

__attribute__((visibility("default"))) void* valloc(std::size_t size) {
  void* p = __libc_valloc(size);
  note_alloc(p);
  return p;
}

__attribute__((visibility("default"))) void* pvalloc(std::size_t size) {
  void* p = __libc_pvalloc(size);
  note_alloc(p);
  return p;
}

}  // extern "C"
