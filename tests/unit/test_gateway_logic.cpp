#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "gateway/cli.hpp"
#include "gateway/errors.hpp"
#include "gateway/retry_policy.hpp"
#include "gateway/gateway_state.hpp"
#include "gateway/server.hpp"

using namespace infergate::gateway;
using namespace std::chrono_literals;
using ::testing::HasSubstr;

TEST(ErrorBodyTest, OpenAiShape) {
  auto j = nlohmann::json::parse(error_body("no backend \"x\"", "service_unavailable", 503));
  EXPECT_EQ(j["error"]["message"], "no backend \"x\"");
  EXPECT_EQ(j["error"]["type"], "service_unavailable");
  EXPECT_EQ(j["error"]["code"], 503);
  EXPECT_NO_THROW(nlohmann::json::parse(error_body("bad \xff byte", "x", 400)));
  EXPECT_EQ(error_type_for(413), "invalid_request_error");
  EXPECT_EQ(error_type_for(504), "timeout");
}

TEST(RetryPolicyTest, BoundedAttempts) {
  RetryPolicy p(3, 10ms, 1000ms);
  EXPECT_TRUE(p.should_retry(0));
  EXPECT_TRUE(p.should_retry(2));
  EXPECT_FALSE(p.should_retry(3));
  RetryPolicy none(0, 10ms, 1000ms);
  EXPECT_FALSE(none.should_retry(0));
  EXPECT_TRUE(RetryPolicy::is_retryable_status(502));
  EXPECT_TRUE(RetryPolicy::is_retryable_status(503));
  EXPECT_FALSE(RetryPolicy::is_retryable_status(500));
  EXPECT_FALSE(RetryPolicy::is_retryable_status(429));
}

TEST(RetryPolicyTest, RetryAfterTakesDeltaSecondsOnly) {
  EXPECT_EQ(RetryPolicy::retry_after("7"), std::chrono::seconds{7});
  EXPECT_EQ(RetryPolicy::retry_after(" 120 "), std::chrono::seconds{120});
  EXPECT_EQ(RetryPolicy::retry_after(""), std::chrono::seconds{0});
  EXPECT_EQ(RetryPolicy::retry_after("-3"), std::chrono::seconds{0});
  EXPECT_EQ(RetryPolicy::retry_after("1.5"), std::chrono::seconds{0});
  EXPECT_EQ(RetryPolicy::retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), std::chrono::seconds{0});
  EXPECT_EQ(RetryPolicy::retry_after("99999999999999999999999"), RetryPolicy::kMaxRetryAfter);
}

TEST(RetryPolicyTest, ExponentialBackoffWithJitterAndCap) {
  RetryPolicy p(10, 100ms, 1000ms);
  EXPECT_EQ(p.backoff(0, 0.5), 0ms);
  EXPECT_EQ(p.backoff(1, 0.0), 50ms);
  EXPECT_EQ(p.backoff(1, 1.0), 100ms);
  EXPECT_EQ(p.backoff(2, 0.0), 100ms);
  EXPECT_EQ(p.backoff(3, 1.0), 400ms);
  EXPECT_EQ(p.backoff(8, 1.0), 1000ms);  // capped
  EXPECT_EQ(p.backoff(8, 0.0), 500ms);
  for (double r = 0; r < 1; r += 0.1) {
    auto d = p.backoff(2, r);
    EXPECT_GE(d, 100ms);
    EXPECT_LE(d, 200ms);
  }
}

TEST(CliTest, ParsesCommandsAndFlags) {
  auto a = parse_args({"discover", "--json", "--backend", "http://a:1", "--backend=http://b:2",
                       "--no-slurm", "--listen", "127.0.0.1:0", "--set", "health.interval=1s"});
  EXPECT_EQ(a.command, Command::kDiscover);
  EXPECT_TRUE(a.json);
  ASSERT_EQ(a.load.flags.size(), 5u);
  EXPECT_EQ(a.load.flags[0].key, "backends");
  EXPECT_EQ(a.load.flags[1].value, "http://b:2");
  EXPECT_EQ(a.load.flags[2].key, "slurm.enabled");
  EXPECT_EQ(a.load.flags[2].value, "false");
  EXPECT_EQ(a.load.flags[4].key, "health.interval");
  EXPECT_EQ(parse_args({}).command, Command::kServe);
  EXPECT_EQ(parse_args({"--version"}).command, Command::kVersion);
  EXPECT_EQ(parse_args({"config", "--config", "x.yaml"}).load.config_file, "x.yaml");
  // The command may follow the flags.
  auto late = parse_args({"--config", "x.yaml", "discover", "--json"});
  EXPECT_EQ(late.command, Command::kDiscover);
  EXPECT_EQ(late.load.config_file, "x.yaml");
  EXPECT_EQ(parse_args({"--help", "discover"}).command, Command::kHelp);
}

TEST(CliTest, BadFlagsAreOneLineErrors) {
  auto error_of = [](std::vector<std::string> args) -> std::string {
    try {
      parse_args(args);
    } catch (const std::exception& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_THAT(error_of({"--bogus"}), HasSubstr("unknown flag '--bogus'"));
  EXPECT_THAT(error_of({"launch"}), HasSubstr("unknown command 'launch'"));
  EXPECT_THAT(error_of({"--listen"}), HasSubstr("--listen: missing value"));
  EXPECT_THAT(error_of({"--set", "novalue"}), HasSubstr("expected KEY=VALUE"));
  EXPECT_THAT(error_of({"--no-slurm=1"}), HasSubstr("takes no value"));
  EXPECT_THAT(error_of({"--threads", "--listen", "127.0.0.1:0"}),
              HasSubstr("--threads: missing value N (the next argument is the flag --listen)"));
  EXPECT_THAT(error_of({"discover", "config"}), HasSubstr("two commands"));
  EXPECT_THAT(error_of({"config", "--json"}), HasSubstr("--json applies to discover only"));
  EXPECT_THAT(error_of({"--no-slurm", "launch"}), HasSubstr("unexpected argument 'launch'"));
  // Two files are not layered: the second is refused, not silently the only one read.
  EXPECT_THAT(error_of({"--config", "a.yaml", "--config", "b.yaml"}),
              HasSubstr("--config given twice ('a.yaml' and 'b.yaml')"));
  // A setting given twice takes the last (a wrapper's default, overridden by its caller).
  EXPECT_EQ(parse_args({"--threads", "2", "--threads=3"}).load.flags.back().value, "3");
}

TEST(CliTest, HelpListsEveryFlag) {
  auto help = help_text();
  for (auto flag : {"--config", "--listen", "--threads", "--backend", "--no-slurm", "--log-level",
                    "--set", "--json", "--version", "--help"}) {
    EXPECT_THAT(help, HasSubstr(flag));
  }
}

#include "gateway/usage_scanner.hpp"

TEST(UsageScannerTest, NonStreamBody) {
  UsageScanner s;
  s.feed(R"({"id":"x","choices":[],"usage":{"prompt_tokens": 12,"total_tokens":30,"completion_tokens":18}})");
  EXPECT_EQ(s.prompt_tokens(), 12u);
  EXPECT_EQ(s.completion_tokens(), 18u);
}

TEST(UsageScannerTest, StreamKeepsTheLastValues) {
  UsageScanner s;
  s.feed("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
  EXPECT_FALSE(s.prompt_tokens());
  s.feed("data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n");
  s.feed("data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n");
  EXPECT_EQ(s.prompt_tokens(), 5u);
  EXPECT_EQ(s.completion_tokens(), 7u);
}

TEST(UsageScannerTest, OtherTokenCountsAreNotTakenForPromptOrCompletion) {
  UsageScanner s;
  s.feed(R"({"usage":{"total_tokens":30,"prompt_tokens_details":{"cached_tokens":7},)"
         R"("completion_tokens_details":{"reasoning_tokens":4},"xprompt_tokens":99}})");
  EXPECT_FALSE(s.prompt_tokens());
  EXPECT_FALSE(s.completion_tokens());
  s.feed(R"({"usage":{"prompt_tokens": 12,"total_tokens":30,"completion_tokens" : 18}})");
  EXPECT_EQ(s.prompt_tokens(), 12u);
  EXPECT_EQ(s.completion_tokens(), 18u);
}

TEST(UsageScannerTest, IgnoresMalformedNumbers) {
  UsageScanner s;
  s.feed(R"({"usage":{"prompt_tokens":null,"completion_tokens":"x"}})");
  EXPECT_FALSE(s.prompt_tokens());
  EXPECT_FALSE(s.completion_tokens());
}

TEST(ConnectionLimitTest, AutomaticLimitLeavesTwoDescriptorsPerRequestAndAReserve) {
  // 20,000 descriptors, one backend: 64 reserved plus two probe connections, then half.
  EXPECT_EQ(client_connection_limit(0, 20000, 1), (20000 - 64 - 2) / 2);
  // Health probes of many backends come out of the same budget.
  EXPECT_EQ(client_connection_limit(0, 20000, 1024), (20000 - 64 - 2048) / 2);
  EXPECT_LT(client_connection_limit(0, 1024, 0), 1024 / 2);
}

TEST(ConnectionLimitTest, ConfiguredLimitWinsAndTinyLimitsStillServe) {
  EXPECT_EQ(client_connection_limit(5, 20000, 1), 5);
  EXPECT_EQ(client_connection_limit(50000, 1024, 1), 50000);  // the operator's choice
  EXPECT_EQ(client_connection_limit(0, 10, 100), 1);          // never zero: one client at a time
}

TEST(BodyMemoryTest, AutomaticLimitIsAQuarterOfTheMemoryTheGatewayMayUse) {
  constexpr std::uint64_t GiB = 1ULL << 30;
  constexpr std::uint64_t MiB = 1ULL << 20;
  EXPECT_EQ(body_memory_limit(0, 64 * MiB, 24 * GiB, std::nullopt), 6 * GiB);
  EXPECT_EQ(body_memory_limit(0, 64 * MiB, 1024 * GiB, 16 * GiB), 4 * GiB);  // a Slurm job's cgroup
  EXPECT_EQ(body_memory_limit(0, 64 * MiB, 1024 * GiB, 128 * MiB), 64 * MiB);  // one largest body fits
  EXPECT_EQ(body_memory_limit(3 * GiB, 64 * MiB, 24 * GiB, 1 * GiB), 3 * GiB);  // the operator's choice
}

TEST(BodyMemoryTest, CgroupLimitIsTheLowestOnThePathUpOrTheV1Controllers) {
  const auto root = std::filesystem::temp_directory_path() / ("infergate-cgroup-" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  auto write = [&](const std::string& rel, const std::string& text) {
    std::filesystem::create_directories((root / rel).parent_path());
    std::ofstream(root / rel) << text;
  };
  // v2: the step's group has no limit of its own ("max"), the job's has 8 GiB, the user's 16 GiB.
  write("user/job_7/step_0/memory.max", "max\n");
  write("user/job_7/memory.max", "8589934592\n");
  write("user/memory.max", "17179869184\n");
  EXPECT_EQ(cgroup_memory_limit("0::/user/job_7/step_0\n", root.string()), 8589934592ULL);
  EXPECT_EQ(cgroup_memory_limit("0::/elsewhere\n", root.string()), std::nullopt);
  EXPECT_EQ(cgroup_memory_limit("", root.string()), std::nullopt);
  // v1: the memory controller's line; its "no limit" value is no limit.
  write("memory/slurm/uid_1/job_9/memory.limit_in_bytes", "4294967296\n");
  EXPECT_EQ(cgroup_memory_limit("12:cpuset:/slurm\n11:memory:/slurm/uid_1/job_9\n", root.string()), 4294967296ULL);
  write("memory/free/memory.limit_in_bytes", "9223372036854771712\n");
  EXPECT_EQ(cgroup_memory_limit("4:memory:/free\n", root.string()), std::nullopt);
  // A Slurm task's group under its job's, which holds the limit.
  write("memory/slurm/uid_1/job_9/step_0/task_0/memory.limit_in_bytes", "9223372036854771712\n");
  EXPECT_EQ(cgroup_memory_limit("11:memory:/slurm/uid_1/job_9/step_0/task_0\n", root.string()), 4294967296ULL);
  // A container: the file names the host's path, the mount's top is the container's own group.
  write("memory/memory.limit_in_bytes", "2147483648\n");
  EXPECT_EQ(cgroup_memory_limit("11:memory:/docker/0123abcd\n", root.string()), 2147483648ULL);
  std::filesystem::remove_all(root);
}

TEST(BodyMemoryTest, ReservationsShareTheLimitAndGiveBackWhatTheyHeld) {
  std::atomic<std::uint64_t> held{0};
  {
    BodyReservation a(&held);
    BodyReservation b(&held);
    EXPECT_TRUE(a.grow_to(600, 1000));
    EXPECT_TRUE(a.grow_to(500, 1000));  // already held: nothing more taken
    EXPECT_EQ(held.load(), 600u);
    EXPECT_FALSE(b.grow_to(500, 1000));  // 1,100 would pass the limit: nothing taken
    EXPECT_EQ(held.load(), 600u);
    EXPECT_TRUE(b.grow_to(400, 1000));
    EXPECT_EQ(held.load(), 1000u);
    EXPECT_FALSE(a.grow_to(700, 1000));  // a chunked body growing: refused, what it held kept
    EXPECT_EQ(a.bytes(), 600u);
    a.release();
    EXPECT_EQ(held.load(), 400u);
    EXPECT_TRUE(a.grow_to(600, 1000));
  }
  EXPECT_EQ(held.load(), 0u);  // both gave theirs back when they ended
}

TEST(ConnectionLimitTest, SlotsAreTakenUpToTheLimitAndFollowTheirOwner) {
  std::atomic<std::int64_t> taken{0};
  auto a = ConnectionSlot::try_take(taken, 2);
  auto b = ConnectionSlot::try_take(taken, 2);
  EXPECT_TRUE(a);
  EXPECT_TRUE(b);
  EXPECT_FALSE(ConnectionSlot::try_take(taken, 2));  // a third waits
  EXPECT_EQ(taken.load(), 2);
  {
    ConnectionSlot moved = std::move(a);  // a session hands its slot to a stream relay
    EXPECT_FALSE(a);
    EXPECT_EQ(taken.load(), 2);
  }
  EXPECT_EQ(taken.load(), 1);  // the connection closed
  auto c = ConnectionSlot::try_take(taken, 2);
  EXPECT_TRUE(c);
  c = ConnectionSlot();  // assigning over a slot gives it back
  EXPECT_EQ(taken.load(), 1);
  EXPECT_TRUE(ConnectionSlot::try_take(taken, 0));  // no limit
}

// A backlogged stream is read in whatever sizes the socket gives: every split of a usage object
// between two reads, and the same object fed one byte at a time, must count the same.
TEST(UsageScannerTest, ReadsUsageSplitAtAnyByte) {
  const std::string body =
      "data: {\"choices\":[],\"usage\":{\"prompt_tokens\": 1234,\n  \"total_tokens\":1801,"
      "\"completion_tokens\" :\t567}}\n\ndata: [DONE]\n\n";
  for (std::size_t cut = 0; cut <= body.size(); ++cut) {
    UsageScanner s;
    s.feed(std::string_view(body).substr(0, cut));
    s.feed(std::string_view(body).substr(cut));
    EXPECT_EQ(s.prompt_tokens(), 1234u) << "split at " << cut;
    EXPECT_EQ(s.completion_tokens(), 567u) << "split at " << cut;
  }
  UsageScanner bytewise;
  for (char c : body) bytewise.feed(std::string_view(&c, 1));
  EXPECT_EQ(bytewise.prompt_tokens(), 1234u);
  EXPECT_EQ(bytewise.completion_tokens(), 567u);
}

TEST(UsageScannerTest, ALaterSplitUsageStillWinsOverAnEarlierOne) {
  UsageScanner s;
  s.feed("data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\ndata: {\"usage\":{\"prompt_tok");
  s.feed("ens\":5,\"completion_tokens\":4");
  s.feed("2}}\n\n");
  EXPECT_EQ(s.prompt_tokens(), 5u);
  EXPECT_EQ(s.completion_tokens(), 42u);
}

#include <boost/asio/io_context.hpp>

#include "gateway/upstream_pool.hpp"

// A pooled connection remembers the ids of the last kIdsKept requests it answered: an answer
// carrying one of them again is a late duplicate, however far behind within them.
TEST(UpstreamConnectionTest, RemembersTheLastAnsweredIds) {
  boost::asio::io_context io;
  infergate::DeadlineList deadlines;
  UpstreamConnection conn(deadlines, io.get_executor());
  EXPECT_FALSE(conn.sent_before(""));
  const int n = static_cast<int>(UpstreamConnection::kIdsKept) + 1;
  for (int i = 0; i < n; ++i) conn.remember_sent("req-" + std::to_string(i));
  EXPECT_FALSE(conn.sent_before("req-0"));  // forgotten: only the last kIdsKept are kept
  for (int i = 1; i < n; ++i) EXPECT_TRUE(conn.sent_before("req-" + std::to_string(i))) << i;
  EXPECT_FALSE(conn.sent_before("req-" + std::to_string(n)));
  EXPECT_FALSE(conn.sent_before("req-1/0"));  // a changed echo is no earlier id
  EXPECT_FALSE(conn.sent_before(""));
}

// The JSON log's message: every line must parse as JSON, whatever bytes a message carries (an
// environment variable's name, a value from a file).
TEST(JsonLogTest, MessagesAreEscapedAndBytesThatAreNotUtf8Replaced) {
  EXPECT_EQ(json_escaped("plain text"), "plain text");
  EXPECT_EQ(json_escaped("a \"quoted\" \\ path"), "a \\\"quoted\\\" \\\\ path");
  EXPECT_EQ(json_escaped(std::string("nl\nnul\0del\x7f", 11)), "nl\\u000anul\\u0000del\\u007f");
  EXPECT_EQ(json_escaped("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"), "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(json_escaped("INFERGATE_X\xff"), "INFERGATE_X\\ufffd");
  EXPECT_EQ(json_escaped("\xc3"), "\\ufffd");                      // cut short
  EXPECT_EQ(json_escaped("\xc0\xaf"), "\\ufffd\\ufffd");            // overlong '/'
  EXPECT_EQ(json_escaped("\xed\xa0\x80"), "\\ufffd\\ufffd\\ufffd");  // a surrogate
  EXPECT_EQ(json_escaped("\xf4\x90\x80\x80"), "\\ufffd\\ufffd\\ufffd\\ufffd");  // past U+10FFFF
  for (const std::string raw : {"\xff\xfe", "x\xe2\x82", "\"\\\x01\xc3\xa9\x80"}) {
    const auto parsed = nlohmann::json::parse("\"" + json_escaped(raw) + "\"");  // throws if not JSON
    EXPECT_TRUE(parsed.is_string());
  }
}

#include "discovery/discovery.hpp"
#include "gateway/admission.hpp"

namespace {

using infergate::discovery::Backend;
using infergate::discovery::BackendState;
using infergate::discovery::Registry;

std::vector<Backend*> add_backends(Registry& registry, int n) {
  for (int i = 0; i < n; ++i) {
    registry.add(infergate::discovery::backend_from_url("http://h:" + std::to_string(1000 + i), "static"));
  }
  auto set = registry.snapshot();
  return {set->routable.begin(), set->routable.end()};
}

std::shared_ptr<Admission::Waiter> waiter_on(boost::asio::io_context& io, std::span<const Backend* const> tried = {},
                                             std::chrono::steady_clock::time_point since = std::chrono::steady_clock::now()) {
  return std::make_shared<Admission::Waiter>(io.get_executor(), tried, since);
}

}  // namespace

// With a limit, a pick takes a place on the backend it returns and skips full ones (saying so);
// without one it takes nothing.
TEST(AdmissionTest, PicksTakePlacesUpToTheLimitAndSayWhenBackendsAreFull) {
  Registry registry;
  auto b = add_backends(registry, 2);
  auto set = registry.snapshot();
  bool full = false;
  EXPECT_EQ(registry.pick(*set, {}, 1, &full), b[0]);
  EXPECT_EQ(registry.pick(*set, {}, 1, &full), b[1]);
  EXPECT_FALSE(full);
  EXPECT_EQ(registry.pick(*set, {}, 1, &full), nullptr);
  EXPECT_TRUE(full);
  EXPECT_EQ(b[0]->stats.inflight.load(), 1);
  EXPECT_EQ(b[1]->stats.inflight.load(), 1);
  EXPECT_NE(registry.pick(*set), nullptr);  // no limit: nothing is taken
  EXPECT_EQ(b[0]->stats.inflight.load() + b[1]->stats.inflight.load(), 2);
  // An excluded backend is not "full": a retry with nothing else left finds none.
  full = false;
  const Backend* tried[] = {b[0], b[1]};
  EXPECT_EQ(registry.pick(*set, tried, 1, &full), nullptr);
  EXPECT_FALSE(full);
}

// A place given back goes to the request that has waited longest and may use it (a retry does
// not get a backend it tried), the waiter's timer is woken on its own executor, and a backend
// out of rotation keeps its place free instead.
TEST(AdmissionTest, APlaceGivenBackGoesToTheOldestWaiterThatMayUseIt) {
  boost::asio::io_context io;
  Registry registry;
  auto b = add_backends(registry, 2);
  Admission admission(registry, 1, 3);
  ASSERT_TRUE(admission.limited());
  auto set = registry.snapshot();
  ASSERT_NE(registry.pick(*set, {}, 1), nullptr);
  ASSERT_NE(registry.pick(*set, {}, 1), nullptr);  // both full
  const Backend* tried_first[] = {b[0]};
  auto retry = waiter_on(io, tried_first);
  auto oldest = waiter_on(io);
  auto next = waiter_on(io);
  auto refused = waiter_on(io);
  ASSERT_TRUE(admission.enqueue(retry));
  ASSERT_TRUE(admission.enqueue(oldest));
  ASSERT_TRUE(admission.enqueue(next));
  EXPECT_FALSE(admission.enqueue(refused));  // limits.max_queued
  EXPECT_EQ(admission.queued(), 3u);
  bool woken = false;
  oldest->timer.expires_after(1h);
  oldest->timer.async_wait([&](boost::system::error_code ec) { woken = ec == boost::asio::error::operation_aborted; });

  admission.give_back(*b[0]);  // the retry tried b[0]: the next oldest gets it
  EXPECT_EQ(admission.leave_if_granted(*retry).get(), nullptr);
  EXPECT_EQ(admission.leave_if_granted(*oldest).get(), b[0]);
  EXPECT_EQ(b[0]->stats.inflight.load(), 1);  // handed over, not freed
  io.run_for(100ms);
  EXPECT_TRUE(woken);
  admission.give_back(*b[1]);  // the retry may use b[1]
  EXPECT_EQ(admission.leave_if_granted(*retry).get(), b[1]);
  EXPECT_EQ(admission.queued(), 1u);

  // Out of rotation: its place stays free, the waiter keeps waiting.
  b[0]->set_state(BackendState::kDraining);
  admission.give_back(*b[0]);
  EXPECT_EQ(b[0]->stats.inflight.load(), 0);
  EXPECT_EQ(admission.leave(*next).get(), nullptr);
  EXPECT_EQ(admission.queued(), 0u);
  EXPECT_EQ(admission.leave(*next).get(), nullptr);  // twice is harmless
}

// One backend with a limit of one place, taken, and room for 8 in the queue.
class OneFullBackend : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(registry.pick(*registry.snapshot(), {}, 1), b[0]); }
  boost::asio::io_context io;
  Registry registry;
  std::vector<Backend*> b = add_backends(registry, 1);
  Admission admission{registry, 1, 8};
};

// Leaving returns a place granted in the meantime, which the caller then holds; with no limit,
// giving back only counts the place down.
TEST_F(OneFullBackend, LeavingReturnsAPlaceGrantedMeanwhileAndNoLimitOnlyCounts) {
  auto waiter = waiter_on(io);
  ASSERT_TRUE(admission.enqueue(waiter));
  admission.give_back(*b[0]);
  EXPECT_EQ(admission.leave(*waiter).get(), b[0]);
  EXPECT_EQ(b[0]->stats.inflight.load(), 1);
  admission.give_back(*b[0]);  // no one waits: freed
  EXPECT_EQ(b[0]->stats.inflight.load(), 0);

  Admission unlimited(registry, 0, 8);
  EXPECT_FALSE(unlimited.limited());
  {
    BackendPlace place(unlimited, *b[0], false);
    EXPECT_EQ(b[0]->stats.inflight.load(), 1);
  }
  EXPECT_EQ(b[0]->stats.inflight.load(), 0);
}

// policy least_inflight: the backend with the fewest requests in flight, in rotation order among
// equals (so round robin while all are idle); the limit and exclusions still apply.
TEST(AdmissionTest, LeastInflightPicksTheLeastBusyAndRotatesAmongEquals) {
  Registry registry;
  registry.set_least_inflight(true);
  auto b = add_backends(registry, 3);
  auto set = registry.snapshot();
  std::vector<const Backend*> idle;
  for (int i = 0; i < 3; ++i) idle.push_back(registry.pick(*set));
  EXPECT_THAT(idle, ::testing::ElementsAre(b[0], b[1], b[2]));
  b[0]->stats.inflight = 5;
  b[1]->stats.inflight = 2;
  b[2]->stats.inflight = 3;
  for (int i = 0; i < 3; ++i) EXPECT_EQ(registry.pick(*set), b[1]);
  const Backend* tried[] = {b[1]};
  EXPECT_EQ(registry.pick(*set, tried), b[2]);
  bool full = false;
  EXPECT_EQ(registry.pick(*set, {}, 3, &full), b[1]);  // takes a place: now 3
  EXPECT_EQ(b[1]->stats.inflight.load(), 3);
  EXPECT_EQ(registry.pick(*set, {}, 3, &full), nullptr);  // every one at 3 or more
  EXPECT_TRUE(full);
}

// A retry that queues again keeps its turn: it goes ahead of the requests that first queued
// after it did.
TEST_F(OneFullBackend, ARequestQueuingAgainKeepsItsTurn) {
  const auto start = std::chrono::steady_clock::now();
  auto newer = waiter_on(io, {}, start + 2s);
  auto retry = waiter_on(io, {}, start + 1s);
  ASSERT_TRUE(admission.enqueue(newer));
  ASSERT_TRUE(admission.enqueue(retry));  // queued later, first queued earlier
  admission.give_back(*b[0]);
  EXPECT_EQ(admission.leave_if_granted(*retry).get(), b[0]);
  EXPECT_EQ(admission.leave(*newer).get(), nullptr);
}
