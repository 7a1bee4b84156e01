// The deadline sweep that replaces a timer per socket operation, driven with chosen times
// (the sockets are never opened: cancelling one is all a sweep does to it).
#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/write.hpp>

#include "discovery/timed_socket.hpp"

using namespace std::chrono_literals;
using infergate::DeadlineList;
using infergate::TimedSocket;
using Clock = std::chrono::steady_clock;

namespace {

// Sweeps every kSweepInterval from `from` until the socket times out or `until`; returns when.
std::optional<Clock::time_point> sweep_until_timeout(DeadlineList& list, TimedSocket& sock, Clock::time_point from,
                                                     Clock::time_point until) {
  for (auto now = from; now <= until; now += DeadlineList::kSweepInterval) {
    list.sweep(now);
    if (sock.timed_out()) return now;
  }
  return std::nullopt;
}

// One socket on a sweep list, and the time its test starts from.
class TimedSocketTest : public ::testing::Test {
 protected:
  boost::asio::io_context io;
  DeadlineList list;
  TimedSocket sock{list, io.get_executor()};
  const std::chrono::steady_clock::time_point base = infergate::coarse_now();
};

}  // namespace

TEST_F(TimedSocketTest, NearDeadlineExpiresAtTheFirstSweepAfterIt) {
  sock.arm_at(base + 300ms);
  EXPECT_EQ(list.size(), 1u);
  auto when = sweep_until_timeout(list, sock, base, base + 2s);
  ASSERT_TRUE(when);
  EXPECT_GE(*when, base + 300ms);
  EXPECT_LT(*when, base + 300ms + DeadlineList::kSweepInterval);
  EXPECT_EQ(list.size(), 0u);
  EXPECT_EQ(sock.settle(boost::asio::error::operation_aborted), boost::beast::error::timeout);
}

// A socket that timed out stays so (its connection is not reused) until it is closed: the next
// connection on it (a health probe's reconnect) reports its own errors, not a timeout.
TEST_F(TimedSocketTest, ATimeoutEndsWithTheConnection) {
  sock.arm_at(base + 100ms);
  ASSERT_TRUE(sweep_until_timeout(list, sock, base, base + 2s));
  EXPECT_EQ(sock.settle(boost::asio::error::operation_aborted), boost::beast::error::timeout);
  sock.arm_at(base + 10s);
  EXPECT_EQ(sock.settle(boost::asio::error::eof), boost::beast::error::timeout);  // the same connection
  sock.close();
  EXPECT_FALSE(sock.timed_out());
  EXPECT_EQ(list.size(), 0u);
  sock.arm_at(base + 10s);
  EXPECT_EQ(sock.settle(boost::asio::error::connection_refused), boost::asio::error::connection_refused);
  EXPECT_EQ(sock.settle(boost::asio::error::eof), boost::asio::error::eof);
}

TEST_F(TimedSocketTest, FarDeadlineIsEnforcedNoLaterThanANearOne) {
  const auto deadline = base + 60s;  // a stream's idle timeout: on the far list
  sock.arm_at(deadline);
  auto when = sweep_until_timeout(list, sock, base, base + 70s);
  ASSERT_TRUE(when);
  EXPECT_GE(*when, deadline);
  EXPECT_LT(*when, deadline + 2 * DeadlineList::kSweepInterval);
}

TEST_F(TimedSocketTest, ReArmingSoonerMovesAFarSocketToTheNearList) {
  sock.arm_at(base + 60s);
  list.sweep(base);  // the far walk runs now, not again for a second
  sock.arm_at(base + 200ms);
  EXPECT_EQ(list.size(), 1u);
  auto when = sweep_until_timeout(list, sock, base + 100ms, base + 1s);
  ASSERT_TRUE(when);
  EXPECT_LT(*when, base + 200ms + DeadlineList::kSweepInterval);
}

// A shutdown's deadline ends every wait under way at once, near or far, and any wait armed after
// it at the next sweep, however long its own deadline.
TEST_F(TimedSocketTest, ExpireAllEndsEveryWaitAndThoseArmedAfterIt) {
  TimedSocket far{list, io.get_executor()};
  sock.arm_at(base + 300ms);
  far.arm_at(base + 1h);
  ASSERT_EQ(list.size(), 2u);
  EXPECT_FALSE(list.cut());
  list.expire_all();
  EXPECT_TRUE(list.cut());
  EXPECT_TRUE(sock.timed_out());
  EXPECT_TRUE(far.timed_out());
  EXPECT_EQ(list.size(), 0u);
  TimedSocket later{list, io.get_executor()};
  later.arm_at(infergate::coarse_now() + 1h);
  list.sweep(infergate::coarse_now() + DeadlineList::kSweepInterval);
  EXPECT_TRUE(later.timed_out());
}

TEST(DeadlineListTest, SettledSocketsLeaveTheListAndNeverTimeOut) {
  boost::asio::io_context io;
  DeadlineList list;
  TimedSocket near(list, io.get_executor());
  TimedSocket far(list, io.get_executor());
  const auto base = infergate::coarse_now();
  near.arm_at(base + 100ms);
  far.arm_at(base + 30s);
  EXPECT_EQ(list.size(), 2u);
  EXPECT_FALSE(near.settle({}));
  EXPECT_FALSE(far.settle({}));
  EXPECT_EQ(list.size(), 0u);
  for (auto now = base; now <= base + 40s; now += DeadlineList::kSweepInterval) list.sweep(now);
  EXPECT_FALSE(near.timed_out());
  EXPECT_FALSE(far.timed_out());
}

TEST_F(TimedSocketTest, ACapBoundsEveryDeadlineUntilLifted) {
  sock.cap_at(base + 300ms);  // a request's timeouts.total
  sock.arm_at(base + 60s);    // a step's own timeout, far longer
  auto when = sweep_until_timeout(list, sock, base, base + 2s);
  ASSERT_TRUE(when);
  EXPECT_LT(*when, base + 300ms + DeadlineList::kSweepInterval);
  EXPECT_TRUE(sock.past_cap(base));  // the sweep saw the cap run out, whatever the caller's clock

  TimedSocket own(list, io.get_executor());  // its own, shorter deadline runs out first
  own.cap_at(base + 300ms);
  own.arm_at(base + 100ms);
  auto own_when = sweep_until_timeout(list, own, base, base + 2s);
  ASSERT_TRUE(own_when);
  EXPECT_FALSE(own.past_cap(*own_when));

  TimedSocket lifted(list, io.get_executor());
  lifted.cap_at(base - 1s);
  lifted.cap_at(Clock::time_point::max());
  lifted.arm_at(base + 60s);
  EXPECT_FALSE(sweep_until_timeout(list, lifted, base, base + 2s));
  EXPECT_FALSE(lifted.past_cap(base + 2s));
}

namespace {

// A connected loopback pair: the gateway's side in a TimedSocket, the client's plain.
struct LoopbackPair {
  explicit LoopbackPair(boost::asio::io_context& io, DeadlineList& list)
      : client(io), server(list, io.get_executor()) {
    using boost::asio::ip::tcp;
    tcp::acceptor acceptor(io, tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    client.connect(acceptor.local_endpoint());
    acceptor.accept(server.socket());
  }
  boost::asio::ip::tcp::socket client;
  TimedSocket server;
};

}  // namespace

// Ending waits between requests (shutdown; room at the connection limit): only waits marked as
// such, begun at least `min_wait` ago, on connections whose client has sent nothing yet.
TEST(DeadlineListTest, EndsOnlyOldEnoughIdleWaitsWithNothingPending) {
  boost::asio::io_context io;
  DeadlineList list;
  LoopbackPair idle(io, list), busy(io, list), talking(io, list);
  const auto far = infergate::coarse_now() + 1h;
  idle.server.arm_at(far);
  idle.server.waiting_between_requests();
  busy.server.arm_at(far);  // a wait within a request: never ended early
  talking.server.arm_at(far);
  talking.server.waiting_between_requests();
  boost::asio::write(talking.client, boost::asio::buffer(std::string("GET / HTTP/1.1\r\n")));
  // The bytes must have reached the gateway's side before it looks.
  for (int i = 0; i < 1000 && talking.server.socket().available() == 0; ++i) std::this_thread::sleep_for(1ms);
  ASSERT_GT(talking.server.socket().available(), 0u);

  EXPECT_EQ(list.end_waits_between_requests(16, 1h), 0u);  // the idle wait is too recent
  EXPECT_FALSE(idle.server.timed_out());
  EXPECT_EQ(list.end_waits_between_requests(16, 0s), 1u);
  EXPECT_TRUE(idle.server.timed_out());
  EXPECT_FALSE(busy.server.timed_out());
  EXPECT_FALSE(talking.server.timed_out());
}

namespace {

// Runs `io` in short slices until `done()` holds or `limit` has passed; returns whether it held.
template <typename Done>
bool run_until(boost::asio::io_context& io, Done done, Clock::duration limit) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    io.run_for(5ms);
  }
  return true;
}

struct CountingHook : infergate::SlowHook {
  int calls = 0;
  void on_slow() override { ++calls; }
};

// The sweeps on a thread with nothing due soon, driven by a real io_context. The list outlives
// the context: the sweep's frame, destroyed with the context, tells the list it is gone.
class SweepForeverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    boost::asio::co_spawn(io, infergate::sweep_forever(list, "test", [this](Clock::time_point) { ++seconds; }),
                          boost::asio::detached);
    // Nothing is due: after kQuietBeforeSlowing the sweeper sleeps a whole kFarSweepInterval.
    ASSERT_TRUE(run_until(io, [this] { return list.sweeper_sleeping(); }, 10s));
    slept = Clock::now();
  }
  DeadlineList list;
  boost::asio::io_context io;
  int seconds = 0;
  Clock::time_point slept;
};

}  // namespace

// A deadline due before the long sleep ends wakes the sweeper: it is enforced as if the sweeps
// had never slowed (within a sweep interval or two), not when the sleep would have ended.
TEST_F(SweepForeverTest, ANearDeadlineWakesASlowedSweeper) {
  TimedSocket sock(list, io.get_executor());
  sock.arm(100ms);
  ASSERT_TRUE(run_until(io, [&] { return sock.timed_out(); }, 10s));
  EXPECT_LT(Clock::now() - slept, DeadlineList::kFarSweepInterval - 300ms);
  EXPECT_FALSE(list.sweeper_sleeping());
}

// A far deadline leaves it asleep: the sleep ends before such a deadline is due.
TEST_F(SweepForeverTest, AFarDeadlineLeavesItAsleep) {
  TimedSocket sock(list, io.get_executor());
  sock.arm(1h);
  io.run_for(20ms);
  EXPECT_TRUE(list.sweeper_sleeping());
  EXPECT_FALSE(sock.timed_out());
}

// A hook waiting for the next sweep (a long exchange's client watch) wakes it too.
TEST_F(SweepForeverTest, ASlowHookWakesASlowedSweeper) {
  CountingHook hook;
  list.add_slow(hook);
  ASSERT_TRUE(run_until(io, [&] { return hook.calls == 1; }, 10s));
  EXPECT_LT(Clock::now() - slept, DeadlineList::kFarSweepInterval - 300ms);
}

// The once-a-second work (closing idle pooled connections) goes on while the sweeps are slow.
TEST_F(SweepForeverTest, TheSecondlyWorkGoesOnWhileSlow) {
  const int before = seconds;
  ASSERT_TRUE(run_until(io, [&] { return seconds >= before + 2; }, 10s));
  EXPECT_TRUE(run_until(io, [&] { return list.sweeper_sleeping(); }, 5s));  // and it sleeps on
}

// A far deadline (a probe's 2 s timeout, a stream's idle one) armed while the sweeps are fast is
// moved near by a far-list walk; a sweeper that slows down in between must still make that walk
// on time, not a second later: the deadline is enforced within a sweep interval or two.
TEST(SweepForeverPhaseTest, AFarDeadlineIsEnforcedOnTimeWhenTheSweepsSlowDownBeforeIt) {
  DeadlineList list;
  boost::asio::io_context io;
  boost::asio::co_spawn(io, infergate::sweep_forever(list, "test", {}), boost::asio::detached);
  io.run_for(50ms);  // the first far walk has run: the next is a second later
  TimedSocket sock(list, io.get_executor());
  const auto armed = Clock::now();
  sock.arm(1200ms);  // far; due after the next walk, before the sweeper's first long sleep ends
  ASSERT_TRUE(run_until(io, [&] { return sock.timed_out(); }, 10s));
  EXPECT_LT(Clock::now() - armed, 1200ms + 3 * DeadlineList::kSweepInterval);
}
