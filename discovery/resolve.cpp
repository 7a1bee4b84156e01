#include "discovery/resolve.hpp"

#include <atomic>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace infergate::discovery {

namespace net = boost::asio;
namespace beast = boost::beast;
using tcp = net::ip::tcp;

namespace {

std::atomic<int> in_flight{0};

// Shared by the waiting caller and the lookup's handler, which may outlive the caller.
struct PendingLookup {
  explicit PendingLookup(const net::any_io_executor& ex) : resolver(ex), timer(ex) {}
  tcp::resolver resolver;
  net::steady_timer timer;
  bool done = false;
  beast::error_code ec;
  tcp::resolver::results_type results;
};

}  // namespace

net::awaitable<std::pair<beast::error_code, tcp::resolver::results_type>> resolve_by(
    net::any_io_executor executor, std::string host, std::string port, std::chrono::steady_clock::time_point deadline,
    std::vector<net::steady_timer*>* waits) {
  // An address needs no lookup, and must not wait in Asio's one lookup thread behind a name
  // whose server does not answer.
  beast::error_code parse_ec;
  const auto address = net::ip::make_address(host, parse_ec);
  if (!parse_ec) {
    unsigned long number = 0;
    try {
      number = std::stoul(port);
    } catch (const std::exception&) {
      number = 65536;
    }
    if (number > 65535) co_return std::pair{beast::error_code(net::error::service_not_found), tcp::resolver::results_type{}};
    const tcp::endpoint endpoint(address, static_cast<unsigned short>(number));
    co_return std::pair{beast::error_code{}, tcp::resolver::results_type::create(endpoint, host, port)};
  }
  auto lookup = std::make_shared<PendingLookup>(executor);
  lookup->timer.expires_at(deadline);
  in_flight.fetch_add(1, std::memory_order_relaxed);
  lookup->resolver.async_resolve(host, port,
                                 [lookup](const beast::error_code& ec, tcp::resolver::results_type results) {
                                   in_flight.fetch_sub(1, std::memory_order_relaxed);
                                   lookup->done = true;
                                   lookup->ec = ec;
                                   lookup->results = std::move(results);
                                   lookup->timer.cancel();
                                 });
  if (waits != nullptr) waits->push_back(&lookup->timer);
  co_await lookup->timer.async_wait(net::as_tuple(net::use_awaitable));
  if (waits != nullptr) std::erase(*waits, &lookup->timer);
  if (!lookup->done) {
    lookup->resolver.cancel();
    co_return std::pair{beast::error_code(beast::error::timeout), tcp::resolver::results_type{}};
  }
  co_return std::pair{lookup->ec, std::move(lookup->results)};
}

int lookups_in_flight() noexcept { return in_flight.load(std::memory_order_relaxed); }

}  // namespace infergate::discovery
