#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>

#include <map>

#include "discovery/discovery.hpp"
#include "discovery/registry.hpp"

using namespace infergate;
using namespace infergate::discovery;
using ::testing::HasSubstr;
using ::testing::Not;

namespace {

config::EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](std::string_view name) -> std::optional<std::string> {
    auto it = vars.find(std::string(name));
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::vector<std::string> urls(const DiscoveryResult& r) {
  std::vector<std::string> out;
  for (const auto& b : r.backends) out.push_back(b.url);
  return out;
}

}  // namespace

TEST(DiscoveryTest, SlurmExampleFromTheIssue) {
  config::Config c;
  auto r = discover(c, env_of({{"SLURM_JOB_NODELIST", "gpu-a[001-003],gpu-b[7,9]"},
                               {"NUM_TRAINING_NODES", "1"},
                               {"INFER_TP", "2"}}));
  ASSERT_EQ(r.backends.size(), 16u);
  EXPECT_EQ(r.backends.front().url, "http://gpu-a002:9000");
  EXPECT_EQ(r.backends.front().node, "gpu-a002");
  EXPECT_EQ(r.backends.front().slot, 0);
  EXPECT_EQ(r.backends.front().source, "slurm");
  EXPECT_EQ(r.backends[3].url, "http://gpu-a002:9003");
  EXPECT_EQ(r.backends[3].slot, 3);
  EXPECT_EQ(r.backends.back().url, "http://gpu-b9:9003");
  EXPECT_EQ(r.backends.back().id, "gpu-b9:9003");
}

TEST(DiscoveryTest, UnionWithStaticBackendsWithoutDuplicates) {
  config::Config c;
  c.backends = {"http://gpu-b9:9000", "http://10.0.0.5:8000", "http://10.0.0.5:8000"};
  auto r = discover(c, env_of({{"SLURM_JOB_NODELIST", "train1,gpu-b9"}, {"INFER_TP", "4"}}));
  EXPECT_THAT(urls(r), ::testing::ElementsAre("http://gpu-b9:9000", "http://gpu-b9:9001",
                                              "http://10.0.0.5:8000"));
  EXPECT_EQ(r.backends[2].source, "static");
}

TEST(DiscoveryTest, NoSlurmUsesOnlyStatic) {
  config::Config c;
  c.slurm.enabled = false;
  c.backends = {"http://127.0.0.1:1234"};
  auto r = discover(c, env_of({{"SLURM_JOB_NODELIST", "a,b"}}));
  EXPECT_THAT(urls(r), ::testing::ElementsAre("http://127.0.0.1:1234"));
  EXPECT_THAT(r.how, HasSubstr("disabled"));
  // The message names how it was disabled.
  c.sources["slurm.enabled"] = config::Source::kFlag;
  EXPECT_THAT(discover(c, env_of({})).how, HasSubstr("Slurm discovery disabled (--no-slurm)"));
  c.sources["slurm.enabled"] = config::Source::kEnv;
  EXPECT_THAT(discover(c, env_of({})).how, HasSubstr("Slurm discovery disabled (INFERGATE_SLURM_ENABLED)"));
  c.sources["slurm.enabled"] = config::Source::kFile;
  c.config_file = "gw.yaml";
  EXPECT_THAT(discover(c, env_of({})).how, HasSubstr("Slurm discovery disabled (slurm.enabled in gw.yaml)"));
}

TEST(DiscoveryTest, OutsideSlurmIsEmptyAndSaysWhy) {
  config::Config c;
  auto r = discover(c, env_of({}));
  EXPECT_TRUE(r.backends.empty());
  EXPECT_THAT(r.how, HasSubstr("SLURM_JOB_NODELIST unset"));
  EXPECT_THAT(r.how, Not(HasSubstr("heterogeneous")));
  // `salloc -N1 : -N2` sets no plain nodelist, only the groups' (checked on Slurm 22.05).
  auto het = discover(c, env_of({{"SLURM_HET_SIZE", "2"}, {"SLURM_JOB_NODELIST_HET_GROUP_1", "n[2-3]"}}));
  EXPECT_TRUE(het.backends.empty());
  EXPECT_THAT(het.how, HasSubstr("SLURM_JOB_NODELIST unset); this is a heterogeneous job (SLURM_HET_SIZE=2): set "
                                 "slurm.het_group (INFERGATE_SLURM_HET_GROUP)"));
}

TEST(DiscoveryTest, ConfigOverridesEnvironment) {
  config::Config c;
  c.slurm.nodelist = "t,n[1-2]";
  c.slurm.infer_tp = 8;
  c.slurm.base_port = 8100;
  c.slurm.host_suffix = "-ib";
  c.slurm.domain = "cluster.local";
  auto r = discover(c, env_of({{"SLURM_JOB_NODELIST", "other"}, {"INFER_TP", "1"}}));
  EXPECT_THAT(urls(r), ::testing::ElementsAre("http://n1-ib.cluster.local:8100",
                                              "http://n2-ib.cluster.local:8100"));
  EXPECT_EQ(r.backends[0].node, "n1");
}

TEST(DiscoveryTest, BadInputIsOneLineError) {
  config::Config c;
  try {
    discover(c, env_of({{"SLURM_JOB_NODELIST", "gpu[1-"}}));
    FAIL() << "expected DiscoveryError";
  } catch (const DiscoveryError& e) {
    EXPECT_THAT(e.what(), HasSubstr("gpu[1-"));
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
  EXPECT_THROW(discover(c, env_of({{"SLURM_JOB_NODELIST", "a,b"}, {"INFER_TP", "3"}})), DiscoveryError);
  EXPECT_THROW(backend_from_url("https://x:1", "static"), DiscoveryError);
  EXPECT_THROW(backend_from_url("http://x", "static"), DiscoveryError);
  EXPECT_THROW(backend_from_url("http://:80", "static"), DiscoveryError);
  EXPECT_EQ(backend_from_url("http://x:1/", "admin").id, "x:1");
  EXPECT_THROW(backend_from_url("http://a..b:1", "admin"), DiscoveryError);
  EXPECT_THROW(backend_from_url("http://127.0.0.01:1", "admin"), DiscoveryError);
}

// One server has one id, however its URL is written: the scheme and host names in any case, an
// IPv6 address in RFC 5952's form. A list naming it twice so gives one backend.
TEST(DiscoveryTest, OneServerWrittenTwoWaysIsOneBackend) {
  const auto named = backend_from_url("HTTP://GPU-A001.Cluster:9000", "static");
  EXPECT_EQ(named.id, "gpu-a001.cluster:9000");
  EXPECT_EQ(named.url, "http://gpu-a001.cluster:9000");
  EXPECT_EQ(backend_from_url("http://[0:0:0:0:0:0:0:1]:80", "static").id, "[::1]:80");
  EXPECT_EQ(backend_from_url("http://[2001:DB8::0:1]:81", "static").id, "[2001:db8::1]:81");
  config::Config c;
  c.slurm.enabled = false;
  c.backends = {"http://node1:9000", "http://NODE1:9000", "http://[::1]:80", "http://[0::1]:80"};
  EXPECT_EQ(discover(c, env_of({})).backends.size(), 2u);
  // A node Slurm names in capitals is the same server as its URL in lower case.
  config::Config job;
  const auto from_slurm = discover(job, env_of({{"SLURM_JOB_NODELIST", "TRAIN,GPU01"}}));
  ASSERT_FALSE(from_slurm.backends.empty());
  EXPECT_EQ(from_slurm.backends.front().id, "gpu01:9000");
  EXPECT_EQ(from_slurm.backends.front().node, "GPU01");  // Slurm's name for the node, as given
  job.backends = {"http://gpu01:9000", "http://GPU01:9001"};
  EXPECT_EQ(discover(job, env_of({{"SLURM_JOB_NODELIST", "TRAIN,GPU01"}})).backends.size(), from_slurm.backends.size());
}

TEST(RegistryTest, RoundRobinIsAnExactRotation) {
  Registry registry;
  for (int i = 0; i < 4; ++i) registry.add(backend_from_url("http://h:" + std::to_string(1000 + i), "static"));
  auto set = registry.snapshot();
  ASSERT_EQ(set->routable.size(), 4u);
  std::vector<std::string> picked;
  for (int i = 0; i < 8; ++i) picked.push_back(registry.pick(*set)->info().id);
  EXPECT_THAT(picked, ::testing::ElementsAre("h:1000", "h:1001", "h:1002", "h:1003", "h:1000",
                                             "h:1001", "h:1002", "h:1003"));
}

// Requests that each need a retry still start on every backend in turn: the retries' picks do
// not move the rotation (with two backends, every first attempt went to the same one).
TEST(RegistryTest, RetriesDoNotTurnTheRotation) {
  Registry registry;
  auto a = registry.add(backend_from_url("http://h:1", "static"));
  auto b = registry.add(backend_from_url("http://h:2", "static"));
  auto set = registry.snapshot();
  int first_on_a = 0;
  for (int request = 0; request < 10; ++request) {
    Backend* first = registry.pick(*set);
    if (first == a.get()) ++first_on_a;
    std::vector<const Backend*> tried{first};
    Backend* retry = registry.pick(*set, tried);
    EXPECT_NE(retry, first);
    EXPECT_NE(retry, nullptr);
  }
  EXPECT_EQ(first_on_a, 5);
  EXPECT_NE(b.get(), nullptr);
}

TEST(RegistryTest, PickSkipsExcludedAndUnhealthy) {
  Registry registry;
  auto a = registry.add(backend_from_url("http://h:1", "static"));
  auto b = registry.add(backend_from_url("http://h:2", "static"));
  auto c = registry.add(backend_from_url("http://h:3", "static"));
  b->set_state(BackendState::kUnhealthy);
  registry.republish();
  auto set = registry.snapshot();
  ASSERT_EQ(set->routable.size(), 2u);
  std::vector<const Backend*> exclude{a.get()};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(registry.pick(*set, exclude), c.get());
  exclude.push_back(c.get());
  EXPECT_EQ(registry.pick(*set, exclude), nullptr);
}

// The request path decides an ejection before the health checker's thread applies it: a
// backend whose last passive.failures requests failed is not picked meanwhile.
TEST(RegistryTest, PickSkipsABackendWhoseEjectionIsDecided) {
  Registry registry;
  auto a = registry.add(backend_from_url("http://h:1", "static"));
  auto b = registry.add(backend_from_url("http://h:2", "static"));
  auto set = registry.snapshot();
  b->stats.consecutive_failures = 3;
  for (int i = 0; i < 4; ++i) EXPECT_EQ(registry.pick(*set), i % 2 == 0 ? a.get() : b.get());  // no limit set
  registry.set_passive_limit(3);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(registry.pick(*set), a.get());
  b->stats.consecutive_failures = 2;
  std::set<const Backend*> picked;
  for (int i = 0; i < 4; ++i) picked.insert(registry.pick(*set));
  EXPECT_EQ(picked.size(), 2u);
  a->stats.consecutive_failures = 3;
  b->stats.consecutive_failures = 3;
  EXPECT_EQ(registry.pick(*set), nullptr);
}

TEST(RegistryTest, AddRemoveKeepsIndexesStable) {
  Registry registry;
  auto a = registry.add(backend_from_url("http://h:1", "static"));
  auto again = registry.add(backend_from_url("http://h:1", "admin"));
  EXPECT_EQ(a, again);
  auto b = registry.add(backend_from_url("http://h:2", "static"));
  auto old_snapshot = registry.snapshot();
  EXPECT_TRUE(registry.remove("h:1"));
  EXPECT_FALSE(registry.remove("h:1"));
  EXPECT_EQ(a->state(), BackendState::kRemoved);
  EXPECT_EQ(old_snapshot->all.size(), 2u);  // readers holding a snapshot are unaffected
  EXPECT_EQ(registry.snapshot()->all.size(), 1u);
  auto c = registry.add(backend_from_url("http://h:3", "static"));
  EXPECT_EQ(b->index(), 1u);
  EXPECT_EQ(c->index(), 2u);  // never reuses a removed backend's index
  EXPECT_EQ(registry.find("h:3"), c);
  EXPECT_EQ(registry.find("h:1"), nullptr);
}

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "discovery/resolve.hpp"

namespace {

std::pair<boost::beast::error_code, std::vector<boost::asio::ip::tcp::endpoint>> resolve_now(std::string host,
                                                                                              std::string port) {
  boost::asio::io_context io;
  std::pair<boost::beast::error_code, std::vector<boost::asio::ip::tcp::endpoint>> out;
  boost::asio::co_spawn(io, resolve_by(io.get_executor(), host, port, std::chrono::steady_clock::now() + std::chrono::seconds(5)),
                        [&out](std::exception_ptr, auto result) {
                          out.first = result.first;
                          for (const auto& r : result.second) out.second.push_back(r.endpoint());
                        });
  io.run();
  return out;
}

}  // namespace

// Addresses are not looked up: they must not queue behind a name whose server does not answer.
TEST(ResolveTest, AddressesNeedNoLookup) {
  const auto before = lookups_in_flight();
  auto [ec, endpoints] = resolve_now("127.0.0.1", "9000");
  EXPECT_FALSE(ec) << ec.message();
  ASSERT_EQ(endpoints.size(), 1u);
  EXPECT_EQ(endpoints[0].port(), 9000);
  EXPECT_TRUE(endpoints[0].address().is_loopback());
  auto [ec6, endpoints6] = resolve_now("::1", "9001");
  EXPECT_FALSE(ec6);
  ASSERT_EQ(endpoints6.size(), 1u);
  EXPECT_TRUE(endpoints6[0].address().is_v6());
  EXPECT_TRUE(resolve_now("127.0.0.1", "70000").first);
  EXPECT_EQ(lookups_in_flight(), before);
}

TEST(ResolveTest, NamesAreLookedUpAndCountedUntilAnswered) {
  boost::asio::io_context io;
  boost::beast::error_code ec;
  std::size_t found = 0;
  std::vector<boost::asio::steady_timer*> waits;
  boost::asio::co_spawn(io,
                        resolve_by(io.get_executor(), "localhost", "9000",
                                   std::chrono::steady_clock::now() + std::chrono::seconds(5), &waits),
                        [&](std::exception_ptr, auto result) {
                          ec = result.first;
                          found = result.second.size();
                        });
  io.poll_one();  // runs the lookup up to its wait: started, not yet answered here
  EXPECT_EQ(lookups_in_flight(), 1);
  EXPECT_EQ(waits.size(), 1u);  // the wait's timer, for a shutdown to end
  io.run();
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_GT(found, 0u);
  EXPECT_EQ(lookups_in_flight(), 0);
  EXPECT_TRUE(waits.empty());
}
