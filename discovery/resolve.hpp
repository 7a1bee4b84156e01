// Name lookup with a deadline. getaddrinfo(3) cannot be cancelled: Asio runs it on a private
// thread, and a DNS server that does not answer holds it for as long as resolv.conf's timeouts
// and attempts allow. The caller stops waiting at its deadline instead; the late answer, if any,
// is dropped. Asio runs all lookups of one io_context on one thread, so a hanging lookup also
// delays the next ones: addresses skip the lookup, and callers cache what they resolved.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/error.hpp>

namespace infergate::discovery {

// `timed_out` (boost::beast::error::timeout) when the lookup did not finish by `deadline`, or
// when the wait was ended early: while it waits, its timer is listed in `waits` (if given), and
// cancelling it there ends the wait at once (a shutdown's deadline does).
boost::asio::awaitable<std::pair<boost::beast::error_code, boost::asio::ip::tcp::resolver::results_type>>
resolve_by(boost::asio::any_io_executor executor, std::string host, std::string port,
           std::chrono::steady_clock::time_point deadline,
           std::vector<boost::asio::steady_timer*>* waits = nullptr);

// Lookups started and not yet completed, in the whole process. An io_context's destructor joins
// its lookup thread, so a process with one still unanswered would wait for it to exit.
int lookups_in_flight() noexcept;

}  // namespace infergate::discovery
