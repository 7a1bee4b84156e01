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
  auto back = died.undrain(Clock::now());
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kUnhealthy);

  HealthTracker recovered(policy(), BackendState::kUnhealthy);
  ASSERT_TRUE(recovered.drain());
  for (int i = 0; i < 2; ++i) EXPECT_FALSE(recovered.on_probe(true, now));
  back = recovered.undrain(Clock::now());
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kHealthy);

  HealthTracker unchanged(policy(), BackendState::kHealthy);
  ASSERT_TRUE(unchanged.drain());
  EXPECT_FALSE(unchanged.on_probe(false, now));  // one failure is not enough
  back = unchanged.undrain(Clock::now());
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kHealthy);
}

// Passing probes do not end an ejection, and nor does a drain and undrain: an ejected backend
// undrained before its ejection is over is ejected again until then (its probes passed all the
// while), and comes back once the ejection is over and a probe passes.
TEST(HealthStateTest, ADrainAndUndrainDoesNotEndAnEjection) {
  HealthTracker t(policy(), BackendState::kHealthy);
  const auto now = Clock::now();
  for (int i = 0; i < 3; ++i) t.on_request(true, now);
  ASSERT_EQ(t.state(), BackendState::kEjected);
  const auto until = t.ejected_until();
  ASSERT_TRUE(t.drain());
  for (int i = 0; i < 3; ++i) t.on_probe(true, now);
  auto back = t.undrain(now);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kEjected);
  EXPECT_FALSE(t.on_probe(true, until - std::chrono::milliseconds(1)));
  auto over = t.on_probe(true, until);
  ASSERT_TRUE(over);
  EXPECT_EQ(over->to, BackendState::kHealthy);

  // Undrained after the ejection ran out, with probes passing: healthy at once.
  HealthTracker later(policy(), BackendState::kHealthy);
  for (int i = 0; i < 3; ++i) later.on_request(true, now);
  ASSERT_TRUE(later.drain());
  for (int i = 0; i < 3; ++i) later.on_probe(true, now);
  back = later.undrain(later.ejected_until());
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kHealthy);

  // A backend that was starting stays starting through failed probes (no alarm while loading).
  HealthTracker loading(policy(), BackendState::kStarting);
  ASSERT_TRUE(loading.drain());
  for (int i = 0; i < 3; ++i) loading.on_probe(false, now);
  back = loading.undrain(now);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->to, BackendState::kStarting);
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
  // Ejected again soon after each return: the backoff doubles, up to the maximum.
  auto back_at = now + 1000ms;
  for (auto expected : {2000ms, 4000ms, 4000ms}) {
    auto t0 = back_at + 1s;
    t.on_request(true, t0);
    t.on_request(true, t0);
    ASSERT_TRUE(t.on_request(true, t0));
    EXPECT_EQ(t.ejected_until(), t0 + expected);
    back_at = t0 + expected;
    ASSERT_TRUE(t.on_probe(true, back_at));
  }
  // A success does not reset the backoff; serving for ejection_max (4 s) without an ejection
  // does.
  t.on_request(false, back_at + 1s);
  t.on_request(true, back_at + 3s);
  t.on_request(true, back_at + 3s);
  ASSERT_TRUE(t.on_request(true, back_at + 3s));
  EXPECT_EQ(t.ejected_until(), back_at + 3s + 4000ms);
  back_at += 7s;
  ASSERT_TRUE(t.on_probe(true, back_at));
  t.on_request(true, back_at + 4s);
  t.on_request(true, back_at + 4s);
  ASSERT_TRUE(t.on_request(true, back_at + 4s));
  EXPECT_EQ(t.ejected_until(), back_at + 4s + 1000ms);
}

// A backend that flaps (its requests fail every other second, a success in between each time)
// is let back after each ejection, but for ever shorter spells: the backoff keeps doubling.
TEST(HealthStateTest, AFlappingBackendsBackoffKeepsDoubling) {
  HealthTracker t(policy(), BackendState::kHealthy);
  auto at = Clock::now();
  for (auto expected : {1000ms, 2000ms, 4000ms, 4000ms}) {
    EXPECT_FALSE(t.on_request(false, at));  // served well for a moment
    for (int i = 0; i < 2; ++i) EXPECT_FALSE(t.on_request(true, at + 500ms));
    ASSERT_TRUE(t.on_request(true, at + 500ms));
    EXPECT_EQ(t.ejected_until(), at + 500ms + expected);
    at += 500ms + expected;
    ASSERT_TRUE(t.on_probe(true, at));
    ASSERT_EQ(t.state(), BackendState::kHealthy);
  }
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
  auto tr = t.undrain(Clock::now());
  ASSERT_TRUE(tr);
  EXPECT_EQ(tr->to, BackendState::kHealthy);
  EXPECT_FALSE(t.undrain(Clock::now()));
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
  ASSERT_TRUE(drained.undrain(Clock::now()));
  EXPECT_FALSE(drained.on_request(true, now));
  EXPECT_EQ(drained.state(), BackendState::kHealthy);
}

// Passing probes after an outage prove the health endpoint answers, not that requests succeed:
// the ejection backoff keeps growing until the backend has served ejection_max without one.
TEST(HealthStateTest, BackoffSurvivesRecoveryThroughUnhealthyUntilTheBackendServesLongEnough) {
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
  // Back through an ejection that ends by probe; after a success and 10 s in service (more than
  // ejection_max), the backoff starts again at the base.
  ASSERT_TRUE(t.on_probe(true, now + 20s));
  t.on_request(false, now + 20s);
  EXPECT_EQ(t.ejections(), 2);
  for (int i = 0; i < 3; ++i) t.on_request(true, now + 30s);
  EXPECT_EQ(t.ejected_until(), now + 30s + 1000ms);
  EXPECT_EQ(t.ejections(), 1);
}
