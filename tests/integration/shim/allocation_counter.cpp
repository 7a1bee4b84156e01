// An LD_PRELOAD shim for tests: counts the process's heap allocations (malloc, calloc, realloc
// and the aligned variants; operator new goes through malloc) and, when the process exits,
// writes the count to the file named by IG_TEST_ALLOCATIONS_FILE. The allocations themselves
// are glibc's own (its __libc_* entry points), so nothing else changes.
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>

extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t n, std::size_t size);
void* __libc_realloc(void* p, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);
}

namespace {

// Relaxed increments of a plain counter would race between threads; the builtin is atomic and
// needs no constructor (the shim may be called before any constructor has run).
unsigned long long allocations = 0;

void count() { __atomic_fetch_add(&allocations, 1, __ATOMIC_RELAXED); }

__attribute__((destructor)) void report() {
  const char* path = std::getenv("IG_TEST_ALLOCATIONS_FILE");
  if (path == nullptr) return;
  if (std::FILE* f = std::fopen(path, "w")) {
    std::fprintf(f, "%llu\n", __atomic_load_n(&allocations, __ATOMIC_RELAXED));
    std::fclose(f);
  }
}

}  // namespace

extern "C" {

void* malloc(std::size_t size) {
  count();
  return __libc_malloc(size);
}

void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}

void* realloc(void* p, std::size_t size) {
  count();
  return __libc_realloc(p, size);
}

void* memalign(std::size_t alignment, std::size_t size) {
  count();
  return __libc_memalign(alignment, size);
}

void* aligned_alloc(std::size_t alignment, std::size_t size) {
  count();
  return __libc_memalign(alignment, size);
}

int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  count();
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}

}  // extern "C"
