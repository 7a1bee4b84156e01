// An LD_PRELOAD shim for tests: a DNS server that stops answering for one host name.
// IG_TEST_HANG_HOST names the host; the first IG_TEST_HANG_AFTER lookups of it
// (default 0) resolve to 127.0.0.1, every later one blocks for 30 s and then fails, as
// getaddrinfo(3) does when its name server never answers. Names ending in IG_TEST_UNKNOWN_SUFFIX
// are not known to the name server (EAI_NONAME at once). Other names resolve normally.
#include <dlfcn.h>
#include <netdb.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace {

using GetAddrInfo = int (*)(const char*, const char*, const addrinfo*, addrinfo**);

std::atomic<long> lookups{0};

GetAddrInfo real_getaddrinfo() {
  static const auto real = reinterpret_cast<GetAddrInfo>(::dlsym(RTLD_NEXT, "getaddrinfo"));
  return real;
}

}  // namespace

extern "C" int getaddrinfo(const char* node, const char* service, const addrinfo* hints, addrinfo** res) {
  const char* unknown = std::getenv("IG_TEST_UNKNOWN_SUFFIX");
  if (node != nullptr && unknown != nullptr && std::strlen(node) >= std::strlen(unknown) &&
      std::strcmp(node + std::strlen(node) - std::strlen(unknown), unknown) == 0) {
    return EAI_NONAME;
  }
  const char* hang_host = std::getenv("IG_TEST_HANG_HOST");
  if (node == nullptr || hang_host == nullptr || std::strcmp(node, hang_host) != 0) {
    return real_getaddrinfo()(node, service, hints, res);
  }
  const char* after = std::getenv("IG_TEST_HANG_AFTER");
  if (lookups.fetch_add(1) < (after != nullptr ? std::atol(after) : 0)) {
    return real_getaddrinfo()("127.0.0.1", service, hints, res);
  }
  std::this_thread::sleep_for(std::chrono::seconds(30));
  return EAI_AGAIN;
}
