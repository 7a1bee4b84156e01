#include <gtest/gtest.h>

#include "discovery/health_state.hpp"

using namespace infergate::discovery;
using namespace std::chrono_literals;
using Clock = HealthTracker::Clock;

namespace {
HealthPolicy policy() {
  HealthPolicy p;
  p.healthy_threshold = 2;
  p.unhealthy_threshold = 3;
  p.passive_failures = 3;
  p.ejection_base = 1000ms;
  p.ejection_max = 4000ms;
  return p;
}
}  // namespace

TEST(HealthStateTest, StartingBecomesHealthyAfterThresholdPasses) {
  HealthTracker t(policy());
  auto now = Clock::now();
  EXPECT_EQ(t.state(), BackendState::kStarting);
  EXPECT_FALSE(t.on_probe(true, now));
  auto tr = t.on_probe(true, now);
  ASSERT_TRUE(tr);
  EXPECT_EQ(tr->from, BackendState::kStarting);
  EXPECT_EQ(tr->to, BackendState::kHealthy);
}

TEST(HealthStateTest, StartingStaysStartingThroughFailures) {
  HealthTracker t(policy());
  auto now = Clock::now();
  for (int i = 0; i < 50; ++i) EXPECT_FALSE(t.on_probe(false, now));
  EXPECT_EQ(t.state(), BackendState::kStarting);
  EXPECT_FALSE(t.on_probe(true, now));
  EXPECT_FALSE(t.on_probe(false, now));  // a failure resets the streak of passes
  EXPECT_FALSE(t.on_probe(true, now));
  EXPECT_TRUE(t.on_probe(true, now));
}

TEST(HealthStateTest, HealthyToUnhealthyAndBack) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  EXPECT_FALSE(t.on_probe(false, now));
  EXPECT_FALSE(t.on_probe(false, now));
  auto down = t.on_probe(false, now, "connection refused");
  ASSERT_TRUE(down);
  EXPECT_EQ(down->to, BackendState::kUnhealthy);
  EXPECT_NE(down->reason.find("connection refused"), std::string::npos);
  EXPECT_FALSE(t.on_probe(false, now));  // logged once, not per probe
  EXPECT_FALSE(t.on_probe(true, now));
  auto up = t.on_probe(true, now);
  ASSERT_TRUE(up);
  EXPECT_EQ(up->to, BackendState::kHealthy);
}

// Probes go on while a backend is drained; undraining it goes by what they found since.
TEST(HealthStateTest, UndrainGoesByTheProbesMadeDuringTheDrain) {
  auto now = Clock::now();
  HealthTracker died(policy(), BackendState::kHealthy);
  ASSERT_TRUE(died.drain());
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(died.on_probe(false, now));
  auto back = died.undrain();
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kUnhealthy);

  HealthTracker recovered(policy(), BackendState::kUnhealthy);
  ASSERT_TRUE(recovered.drain());
  for (int i = 0; i < 2; ++i) EXPECT_FALSE(recovered.on_probe(true, now));
  back = recovered.undrain();
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kHealthy);

  HealthTracker unchanged(policy(), BackendState::kHealthy);
  ASSERT_TRUE(unchanged.drain());
  EXPECT_FALSE(unchanged.on_probe(false, now));  // one failure is not enough
  back = unchanged.undrain();
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kHealthy);
}

// The request path's count (several worker threads) can run ahead of the reports the tracker
// has seen; the tracker follows it, so an ejection the router already acts on happens.
TEST(HealthStateTest, PassiveEjectionFollowsTheRequestPathsCount) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  EXPECT_FALSE(t.on_request(true, now, 1));
  auto ej = t.on_request(true, now, 3);
  ASSERT_TRUE(ej);
  EXPECT_EQ(ej->to, BackendState::kEjected);
  // Not healthy: a count says nothing more.
  EXPECT_FALSE(t.on_request(true, now, 7));
}

TEST(HealthStateTest, PassiveFailuresEjectWithDoublingBackoff) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  EXPECT_FALSE(t.on_request(true, now));
  EXPECT_FALSE(t.on_request(true, now));
  auto ej = t.on_request(true, now);
  ASSERT_TRUE(ej);
  EXPECT_EQ(ej->to, BackendState::kEjected);
  EXPECT_EQ(t.ejected_until(), now + 1000ms);
  // A passing probe before the backoff elapsed does not end the ejection; after it does.
  EXPECT_FALSE(t.on_probe(true, now + 500ms));
  auto back = t.on_probe(true, now + 1000ms);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kHealthy);
  // Ejected again before any success: the backoff doubles, up to the maximum.
  for (auto expected : {2000ms, 4000ms, 4000ms}) {
    auto t0 = now + 10s;
    t.on_request(true, t0);
    t.on_request(true, t0);
    ASSERT_TRUE(t.on_request(true, t0));
    EXPECT_EQ(t.ejected_until(), t0 + expected);
    ASSERT_TRUE(t.on_probe(true, t0 + expected));
  }
  // A success resets the backoff.
  t.on_request(false, now + 20s);
  t.on_request(true, now + 20s);
  t.on_request(true, now + 20s);
  ASSERT_TRUE(t.on_request(true, now + 20s));
  EXPECT_EQ(t.ejected_until(), now + 20s + 1000ms);
}

TEST(HealthStateTest, SuccessBetweenFailuresPreventsEjection) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  for (int i = 0; i < 10; ++i) {
    EXPECT_FALSE(t.on_request(true, now));
    EXPECT_FALSE(t.on_request(true, now));
    EXPECT_FALSE(t.on_request(false, now));  // e.g. a 4xx: the client's fault, not counted
  }
  EXPECT_EQ(t.state(), BackendState::kHealthy);
}

TEST(HealthStateTest, EjectedBackendFailingProbesBecomesUnhealthy) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  for (int i = 0; i < 3; ++i) t.on_request(true, now);
  ASSERT_EQ(t.state(), BackendState::kEjected);
  t.on_probe(false, now);
  t.on_probe(false, now);
  auto tr = t.on_probe(false, now);
  ASSERT_TRUE(tr);
  EXPECT_EQ(tr->to, BackendState::kUnhealthy);
}

TEST(HealthStateTest, DrainUndrainRemove) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  ASSERT_TRUE(t.drain());
  EXPECT_EQ(t.state(), BackendState::kDraining);
  EXPECT_FALSE(t.drain());
  EXPECT_FALSE(t.on_probe(false, now));  // probes do not move a draining backend
  EXPECT_FALSE(t.on_request(true, now));
  auto tr = t.undrain();
  ASSERT_TRUE(tr);
  EXPECT_EQ(tr->to, BackendState::kHealthy);
  EXPECT_FALSE(t.undrain());
  ASSERT_TRUE(t.remove());
  EXPECT_EQ(t.state(), BackendState::kRemoved);
  EXPECT_FALSE(t.on_probe(true, now));
  EXPECT_FALSE(t.drain());
}

TEST(HealthStateTest, PassiveFailuresDoNotEjectStartingOrUnhealthy) {
  HealthTracker t(policy());
  auto now = Clock::now();
  for (int i = 0; i < 10; ++i) EXPECT_FALSE(t.on_request(true, now));
  EXPECT_EQ(t.state(), BackendState::kStarting);
}

// Passive ejection counts consecutive failures while healthy: failures of in-flight requests
// before a recovery must not make the first failure after it eject the backend.
TEST(HealthStateTest, RecoveryFromUnhealthyForgetsEarlierRequestFailures) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  for (int i = 0; i < 3; ++i) t.on_probe(false, now);
  ASSERT_EQ(t.state(), BackendState::kUnhealthy);
  EXPECT_FALSE(t.on_request(true, now));
  EXPECT_FALSE(t.on_request(true, now));
  t.on_probe(true, now);
  ASSERT_TRUE(t.on_probe(true, now));
  ASSERT_EQ(t.state(), BackendState::kHealthy);
  EXPECT_FALSE(t.on_request(true, now));
  EXPECT_FALSE(t.on_request(true, now));
  EXPECT_EQ(t.state(), BackendState::kHealthy);
  ASSERT_TRUE(t.on_request(true, now));  // the third failure since the recovery ejects
  EXPECT_EQ(t.state(), BackendState::kEjected);
}

TEST(HealthStateTest, EjectedThroughUnhealthyToHealthyForgetsRequestFailures) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  for (int i = 0; i < 3; ++i) t.on_request(true, now);
  ASSERT_EQ(t.state(), BackendState::kEjected);
  t.on_request(true, now);  // in-flight requests failing while ejected
  t.on_request(true, now);
  for (int i = 0; i < 3; ++i) t.on_probe(false, now);
  ASSERT_EQ(t.state(), BackendState::kUnhealthy);
  t.on_request(true, now);
  t.on_probe(true, now + 5s);
  ASSERT_TRUE(t.on_probe(true, now + 5s));
  EXPECT_FALSE(t.on_request(true, now + 5s));
  EXPECT_EQ(t.state(), BackendState::kHealthy);
}

TEST(HealthStateTest, StartingAndUndrainedBackendsStartWithoutRequestFailures) {
  HealthTracker starting(policy());
  auto now = Clock::now();
  starting.on_request(true, now);
  starting.on_request(true, now);
  starting.on_probe(true, now);
  ASSERT_TRUE(starting.on_probe(true, now));
  EXPECT_FALSE(starting.on_request(true, now));
  EXPECT_EQ(starting.state(), BackendState::kHealthy);

  HealthTracker drained(policy(), BackendState::kHealthy);
  drained.on_request(true, now);
  ASSERT_TRUE(drained.drain());
  drained.on_request(true, now);  // requests still finishing while it drains
  ASSERT_TRUE(drained.undrain());
  EXPECT_FALSE(drained.on_request(true, now));
  EXPECT_EQ(drained.state(), BackendState::kHealthy);
}

// Passing probes after an outage prove the health endpoint answers, not that requests succeed:
// the ejection backoff keeps growing until a request succeeds.
TEST(HealthStateTest, BackoffSurvivesRecoveryThroughUnhealthyUntilARequestSucceeds) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto now = Clock::now();
  for (int i = 0; i < 3; ++i) t.on_request(true, now);
  ASSERT_EQ(t.ejected_until(), now + 1000ms);
  for (int i = 0; i < 3; ++i) t.on_probe(false, now);
  ASSERT_EQ(t.state(), BackendState::kUnhealthy);
  t.on_probe(true, now + 10s);
  ASSERT_TRUE(t.on_probe(true, now + 10s));
  ASSERT_EQ(t.state(), BackendState::kHealthy);
  for (int i = 0; i < 3; ++i) t.on_request(true, now + 10s);
  ASSERT_EQ(t.state(), BackendState::kEjected);
  EXPECT_EQ(t.ejected_until(), now + 10s + 2000ms);  // doubled, not back to the base
  EXPECT_EQ(t.ejections(), 2);
  // Back through an ejection that ends by probe; one success then resets the backoff.
  ASSERT_TRUE(t.on_probe(true, now + 20s));
  t.on_request(false, now + 20s);
  EXPECT_EQ(t.ejections(), 0);
  for (int i = 0; i < 3; ++i) t.on_request(true, now + 30s);
  EXPECT_EQ(t.ejected_until(), now + 30s + 1000ms);
}
