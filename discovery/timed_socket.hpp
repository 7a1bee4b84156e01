// Sockets with deadlines enforced by one sweep per thread (a gateway worker, the health
// checker), instead of a timer per read and write: arming a deadline is a store, and the sweep
// cancels what overran. Timeouts fire up to
// one sweep interval late, which no configured timeout is fine-grained enough to notice.
// A thread with nothing due soon sweeps once a second instead of ten times (sweep_forever).
#pragma once

#include <sys/socket.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>

#include <exception>
#include <functional>
#include <string>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <spdlog/spdlog.h>

namespace infergate {

namespace net = boost::asio;
namespace beast = boost::beast;
using tcp = boost::asio::ip::tcp;

class TimedSocket;
class SlowHook;

// The monotonic clock at jiffy resolution (a few ms): cheaper to read than steady_clock, and
// fine for deadlines that a 100 ms sweep enforces.
inline std::chrono::steady_clock::time_point coarse_now() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return std::chrono::steady_clock::time_point(std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec));
}

// The sockets of one worker thread, for the sweep. Not thread-safe: one per worker.
// Deadlines at least kFarSweepInterval away (a stream's idle timeout, typically a minute) wait on
// a second list that is walked only that often, and move to the near list once due within it: an
// open SSE stream re-arms its deadline for every event, and 10,000 of them would otherwise be
// walked ten times a second for deadlines a minute away. No deadline is enforced later for it.
class DeadlineList {
 public:
  static constexpr auto kSweepInterval = std::chrono::milliseconds(100);
  static constexpr auto kFarSweepInterval = std::chrono::seconds(1);
  // How long the sweeps must have found nothing near before they slow to kFarSweepInterval.
  static constexpr auto kQuietBeforeSlowing = std::chrono::seconds(1);
  DeadlineList() = default;
  DeadlineList(const DeadlineList&) = delete;
  DeadlineList& operator=(const DeadlineList&) = delete;
  // Cancels the pending operation of every socket whose deadline has passed, and calls
  // on_slow() on every hook still waiting.
  void sweep(std::chrono::steady_clock::time_point now);
  std::size_t size() const noexcept { return size_; }
  // Nothing due within kFarSweepInterval and no hook waiting: the next sweep can wait that long.
  bool quiet() const noexcept { return head_ == nullptr && slow_head_ == nullptr; }
  // When the next sweep must walk the far list (max() while it is empty): a slowed sweeper that
  // slept past it would find a deadline due before its wake-up only after it.
  std::chrono::steady_clock::time_point next_far_walk() const noexcept {
    return far_head_ != nullptr ? next_far_sweep_ : std::chrono::steady_clock::time_point::max();
  }
  // The sweeper sleeps on `timer` until `until`: a deadline or hook that cannot wait that long
  // cancels the timer, and the sweeper goes back to sweeping every kSweepInterval. awake() ends it.
  void sleeping(net::steady_timer& timer, std::chrono::steady_clock::time_point until) noexcept {
    sleeper_ = &timer;
    sleep_until_ = until;
  }
  void awake() noexcept { sleeper_ = nullptr; }
  bool sweeper_sleeping() const noexcept { return sleeper_ != nullptr; }
  // Ends waits for a next request (see TimedSocket::waiting_between_requests) on connections
  // whose client has sent nothing yet, at most `max` of them; returns how many. A graceful
  // shutdown ends them all, so idle keep-alive clients see the close at once instead of when
  // the process exits; at the connection limit a few make room for new clients. A connection
  // with bytes already in its socket buffer is left to read and serve them.
  // Only waits begun at least `min_wait` ago count: a client that connected a moment ago is
  // about to send.
  std::size_t end_waits_between_requests(std::size_t max = static_cast<std::size_t>(-1),
                                         std::chrono::steady_clock::duration min_wait = {}) noexcept;
  // Ends every wait under way as if its deadline had passed (a shutdown's deadline), and every
  // wait armed from now on at the next sweep.
  void expire_all() noexcept;
  bool cut() const noexcept { return cut_; }

  // The next sweep calls hook.on_slow() unless remove_slow() comes first: work that only long
  // exchanges need (most requests finish well within one sweep interval).
  void add_slow(SlowHook& hook) noexcept;
  void remove_slow(SlowHook& hook) noexcept;

 private:
  friend class TimedSocket;
  friend class SlowHook;
  TimedSocket* head_ = nullptr;      // due within kFarSweepInterval (or armed that way)
  TimedSocket* far_head_ = nullptr;  // due later
  std::chrono::steady_clock::time_point next_far_sweep_{};
  std::size_t size_ = 0;
  SlowHook* slow_head_ = nullptr;
  bool cut_ = false;  // expire_all() ran: every deadline armed since is due at once
  net::steady_timer* sleeper_ = nullptr;  // the sweeper's timer while it sleeps past kSweepInterval
  std::chrono::steady_clock::time_point sleep_until_{};

  void wake_if_due_before(std::chrono::steady_clock::time_point t) noexcept {
    if (sleeper_ == nullptr || t >= sleep_until_) return;
    auto* timer = std::exchange(sleeper_, nullptr);
    try {
      timer->cancel();
    } catch (const std::exception&) {  // a timer's cancel reports no error; nothing to do if it did
    }
  }
};

class SlowHook {
 public:
  SlowHook() = default;
  SlowHook(const SlowHook&) = delete;
  SlowHook& operator=(const SlowHook&) = delete;
  virtual void on_slow() = 0;

 protected:
  ~SlowHook() {
    if (list_ != nullptr) list_->remove_slow(*this);
  }

 private:
  friend class DeadlineList;
  DeadlineList* list_ = nullptr;  // set while linked
  SlowHook* prev_ = nullptr;
  SlowHook* next_ = nullptr;
};

inline void DeadlineList::add_slow(SlowHook& hook) noexcept {
  if (hook.list_ != nullptr) return;
  hook.list_ = this;
  hook.prev_ = nullptr;
  hook.next_ = slow_head_;
  if (slow_head_ != nullptr) slow_head_->prev_ = &hook;
  slow_head_ = &hook;
  wake_if_due_before(coarse_now());  // due at the next sweep
}

inline void DeadlineList::remove_slow(SlowHook& hook) noexcept {
  if (hook.list_ != this) return;
  if (hook.prev_ != nullptr) hook.prev_->next_ = hook.next_;
  else slow_head_ = hook.next_;
  if (hook.next_ != nullptr) hook.next_->prev_ = hook.prev_;
  hook.list_ = nullptr;
  hook.prev_ = hook.next_ = nullptr;
}

class TimedSocket {
 public:
  using Clock = std::chrono::steady_clock;
  TimedSocket(DeadlineList& list, tcp::socket socket) : socket_(std::move(socket)), list_(&list) {}
  TimedSocket(DeadlineList& list, const net::any_io_executor& ex) : socket_(ex), list_(&list) {}
  ~TimedSocket() { unlink(); }
  TimedSocket(const TimedSocket&) = delete;
  TimedSocket& operator=(const TimedSocket&) = delete;

  tcp::socket& socket() noexcept { return socket_; }

  // Before an operation: it fails with `timeout` if it has not completed within `d`.
  // Only sockets with an operation under way are on the sweep's list: an idle keep-alive or
  // pooled connection costs the sweep nothing.
  template <typename Rep, typename Period>
  void arm(std::chrono::duration<Rep, Period> d) noexcept {
    arm_at(coarse_now() + std::chrono::duration_cast<Clock::duration>(d));
  }
  void arm_at(Clock::time_point t) noexcept {
    t = std::min(t, cap_);
    if (list_->cut_) t = std::min(t, coarse_now());
    deadline_ = t;
    const bool far = t - coarse_now() >= DeadlineList::kFarSweepInterval;
    if (linked_ && far_ && !far) unlink();  // now due sooner than the far list is walked
    link(far);
    // A far deadline is at least kFarSweepInterval away: a slowed sweeper is back before it.
    if (!far) list_->wake_if_due_before(t);
  }
  // After an operation: no deadline while nothing is pending; a cancellation by the sweep
  // becomes a timeout error.
  beast::error_code settle(beast::error_code ec) noexcept {
    deadline_ = Clock::time_point::max();
    between_requests_ = false;
    unlink();
    if (ec && timed_out_) ec = beast::error::timeout;
    return ec;
  }
  // Whether an operation on this connection timed out (it stays so: such a connection is not
  // reused), until close() starts the socket afresh.
  bool timed_out() const noexcept { return timed_out_; }
  // Closes the connection; the socket may open a new one, whose errors are its own (a timeout on
  // the old one must not turn them into timeouts).
  void close() noexcept {
    beast::error_code ignored;
    socket_.close(ignored);
    settle({});
    timed_out_ = false;
    expired_at_cap_ = false;
  }
  // Marks the armed wait as one for a next request on a kept-alive connection (cleared by
  // settle()), which a graceful shutdown may end early.
  void waiting_between_requests() noexcept {
    between_requests_ = true;
    wait_started_ = coarse_now();
  }
  // No operation's deadline goes past `t` (a whole exchange's limit); max() lifts the cap.
  void cap_at(Clock::time_point t) noexcept { cap_ = t; }
  Clock::time_point cap() const noexcept { return cap_; }
  // Whether the cap is what ran out: a timeout at or past it is the exchange's, not the step's.
  // The sweep records whether an expiry was the cap's: its clock can run a few ms ahead of
  // coarse_now(), so a check of the time alone could miss a cap that just ran out. Steps timed
  // by a precise timer (a DNS lookup) end at the cap by that clock, which the check reads (it is
  // only asked after a timeout).
  bool past_cap(Clock::time_point now = Clock::now()) const noexcept {
    return expired_at_cap_ || (cap_ != Clock::time_point::max() && now >= cap_);
  }

 private:
  friend class DeadlineList;
  void link(bool far) noexcept {
    if (linked_) return;  // a near socket stays near: checked more often than it needs
    linked_ = true;
    far_ = far;
    TimedSocket*& head = far ? list_->far_head_ : list_->head_;
    prev_ = nullptr;
    next_ = head;
    if (next_ != nullptr) next_->prev_ = this;
    head = this;
    ++list_->size_;
  }
  void unlink() noexcept {
    if (!linked_) return;
    linked_ = false;
    if (prev_ != nullptr) prev_->next_ = next_;
    else (far_ ? list_->far_head_ : list_->head_) = next_;
    if (next_ != nullptr) next_->prev_ = prev_;
    prev_ = next_ = nullptr;
    --list_->size_;
  }
  void expire() noexcept {
    timed_out_ = true;
    expired_at_cap_ = deadline_ == cap_;
    deadline_ = Clock::time_point::max();
    unlink();
    beast::error_code ignored;
    socket_.cancel(ignored);
  }

  tcp::socket socket_;
  DeadlineList* list_;
  TimedSocket* prev_ = nullptr;
  TimedSocket* next_ = nullptr;
  Clock::time_point deadline_ = Clock::time_point::max();
  Clock::time_point cap_ = Clock::time_point::max();
  bool timed_out_ = false;
  bool expired_at_cap_ = false;
  bool linked_ = false;
  bool far_ = false;  // on the far list (while linked)
  bool between_requests_ = false;
  Clock::time_point wait_started_{};  // of the wait between requests
};

inline void DeadlineList::sweep(std::chrono::steady_clock::time_point now) {
  if (now >= next_far_sweep_) {
    // Runs at least every kFarSweepInterval, so a deadline moved here is never missed: it is
    // due after this walk and within the next one, and the near list is walked every sweep.
    next_far_sweep_ = now + kFarSweepInterval;
    for (auto* s = far_head_; s != nullptr;) {
      auto* next = s->next_;
      if (s->deadline_ <= now + kFarSweepInterval) {
        s->unlink();
        s->link(false);
      }
      s = next;
    }
  }
  for (auto* s = head_; s != nullptr;) {
    auto* next = s->next_;
    if (s->deadline_ <= now) s->expire();
    s = next;
  }
  while (slow_head_ != nullptr) {
    SlowHook* hook = slow_head_;
    remove_slow(*hook);
    hook->on_slow();
  }
}

inline void DeadlineList::expire_all() noexcept {
  cut_ = true;
  for (auto* head : {head_, far_head_}) {
    for (auto* s = head; s != nullptr;) {
      auto* next = s->next_;  // expire() unlinks s
      s->expire();
      s = next;
    }
  }
}

inline std::size_t DeadlineList::end_waits_between_requests(std::size_t max,
                                                            std::chrono::steady_clock::duration min_wait) noexcept {
  std::size_t ended = 0;
  const auto started_by = coarse_now() - min_wait;
  for (auto* head : {far_head_, head_}) {  // the far list first: waits with the most time left
    for (auto* s = head; s != nullptr && ended < max;) {
      auto* next = s->next_;
      char byte = 0;
      if (s->between_requests_ && s->wait_started_ <= started_by &&
          ::recv(s->socket_.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN) {
        s->expire();
        ++ended;
      }
      s = next;
    }
  }
  return ended;
}

// Sweeps `list` every kSweepInterval, or every kFarSweepInterval once the sweeps have found
// nothing near for kQuietBeforeSlowing (an idle gateway; probes, whose timeouts are seconds
// long): each wake-up costs a thread tens of microseconds, and ten a second were half of what an
// idle gateway spent. Calls `every_second` (if set) about once a second. Runs on the list's
// thread until its io_context stops; `who` names the thread in the error a failed sweep logs.
inline net::awaitable<void> sweep_forever(DeadlineList& list, std::string who,
                                          std::function<void(std::chrono::steady_clock::time_point)> every_second) {
  using Clock = std::chrono::steady_clock;
  net::steady_timer timer(co_await net::this_coro::executor);
  struct Awake {  // the list must not keep a pointer to the timer past this frame
    DeadlineList& list;
    ~Awake() { list.awake(); }
  } awake{list};
  auto quiet_since = Clock::now();
  auto next_second = quiet_since + DeadlineList::kFarSweepInterval;
  for (;;) {
    const auto now = Clock::now();
    if (!list.quiet()) quiet_since = now;
    const bool slow = now - quiet_since >= DeadlineList::kQuietBeforeSlowing;
    // A slowed sweeper still walks the far list on time: a deadline moved near by that walk is
    // due within kFarSweepInterval of it, and the walk before found it further off.
    const auto wake = slow ? std::max(now, std::min(now + Clock::duration(DeadlineList::kFarSweepInterval),
                                                    list.next_far_walk()))
                           : now + DeadlineList::kSweepInterval;
    timer.expires_at(wake);
    if (slow) list.sleeping(timer, wake);
    auto [ec] = co_await timer.async_wait(net::as_tuple(net::use_awaitable));
    list.awake();
    if (ec) {  // woken: something is due before the long sleep would have ended
      quiet_since = Clock::now();
      continue;
    }
    // An exception (out of memory) must not end the sweeps: every timeout on this thread hangs
    // on them. The next one tries again.
    try {
      const auto at = Clock::now();
      list.sweep(at);
      if (every_second && at >= next_second) {
        next_second = at + DeadlineList::kFarSweepInterval;
        every_second(at);
      }
    } catch (const std::exception& e) {
      spdlog::error("{}: deadline sweep failed: {}", who, e.what());
    }
  }
}

// Sends what a non-blocking socket takes at once and returns what is left; `ec` is set by a real
// error only. It spares the thread the completion that Asio queues even for a write that
// finished at once. Only where nothing is read right after: that queued turn gives the peer time
// to answer, and a read straight after a request or a response mostly finds nothing yet (tried at
// 64 connections: failed receives went from 0.6 to 1.9 per request).
inline net::const_buffer send_now(tcp::socket& socket, net::const_buffer bytes, beast::error_code& ec) {
  const std::size_t sent = socket.write_some(bytes, ec);
  if (ec == net::error::would_block || ec == net::error::try_again) {
    ec = {};
    return bytes;
  }
  return ec ? bytes : bytes + sent;
}

}  // namespace infergate
