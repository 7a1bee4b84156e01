// An LD_PRELOAD shim for tests: counts the process's heap allocations (malloc, calloc, realloc
// and the aligned variants; operator new goes through malloc) and writes the count so far to the
// file named by IG_TEST_ALLOCATIONS_FILE whenever the process gets SIGUSR2 (the gateway does not
// use that signal). The allocations themselves are glibc's own (its __libc_* entry points), so
// nothing else changes.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
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

const char* report_path = nullptr;

// Async-signal-safe: no allocation, no stdio. The file holds the count and a newline.
void report(int) {
  const int saved = errno;
  char digits[24];
  char* end = digits + sizeof digits;
  char* p = end;
  *--p = '\n';
  unsigned long long n = __atomic_load_n(&allocations, __ATOMIC_RELAXED);
  do {
    *--p = static_cast<char>('0' + n % 10);
    n /= 10;
  } while (n != 0);
  const int fd = ::open(report_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd >= 0) {
    [[maybe_unused]] const auto written = ::write(fd, p, static_cast<std::size_t>(end - p));
    ::close(fd);
  }
  errno = saved;
}

__attribute__((constructor)) void install() {
  report_path = std::getenv("IG_TEST_ALLOCATIONS_FILE");
  if (report_path == nullptr) return;
  struct sigaction action {};
  action.sa_handler = report;
  action.sa_flags = SA_RESTART;
  ::sigaction(SIGUSR2, &action, nullptr);
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
