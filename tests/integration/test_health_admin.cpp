// Health checks, readiness, metrics, the admin API and the status page, end to end.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <csignal>
#include <thread>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "harness.hpp"

using namespace infergate::test;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;
using json = nlohmann::json;

namespace {

std::vector<std::string> backends_of(const std::vector<Mock>& mocks) {
  std::vector<std::string> args;
  for (const auto& m : mocks) {
    args.push_back("--backend");
    args.push_back(m.url());
  }
  return args;
}

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

json admin_backends(int port, const Headers& headers = {}) {
  auto r = http_request(port, "GET", "/admin/backends", "", headers);
  return json::parse(r.body, nullptr, false);
}

std::string state_of(int port, const std::string& id) {
  auto j = admin_backends(port);
  if (!j.is_object()) return "?";
  for (const auto& b : j["backends"]) {
    if (b["id"] == id) return b["state"];
  }
  return "absent";
}

std::string labels_for(const Mock& m) { return "backend=\"" + m.id() + "\",node=\"127.0.0.1\",slot=\"0\""; }

int posted_to(const Mock& m) { return json::parse(http_request(m.port, "GET", "/mock/stats").body)["requests"]; }

// The DOM headless Chromium has built from `url` after `virtual_time` of the page's timers, or
// empty (and a test failure) when it gives none within a minute.
std::string chromium_dom(const std::string& url, std::chrono::milliseconds virtual_time = 3s) {
  auto profile = std::filesystem::temp_directory_path() / ("infergate-chromium-" + std::to_string(getpid()));
  Process chromium("/usr/bin/chromium",
                   {"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--user-data-dir=" + profile.string(),
                    "--virtual-time-budget=" + std::to_string(virtual_time.count()), "--dump-dom", url});
  std::string dom;
  try {
    dom = chromium.wait_for_line(std::regex(R"(([\s\S]*</html>))"), 60s);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  std::error_code ignored;
  std::filesystem::remove_all(profile, ignored);
  return dom;
}

// /admin/backends with the token "secret", once it lists one healthy backend.
std::string authorized_backends(int port) {
  HttpResult backends;
  EXPECT_TRUE(poll_until(
      [&] {
        backends = http_request(port, "GET", "/admin/backends", "", {{"Authorization", "Bearer secret"}});
        return backends.status == 200 && json::parse(backends.body)["gateway"]["healthy"] == 1;
      },
      10s))
      << backends.body;
  return backends.body;
}

// The DOM Chromium ends with for the status page as the gateway serves it (`page`), with
// `stand_ins` (script replacing prompt() and fetch(), in which BACKENDS becomes `backends` as a
// JavaScript string) run before the page's own script, in a function where `html` is the
// document element and `prompts` counts the prompts, with no admin token stored. Headless
// Chromium cannot answer a prompt, hence the stand-ins.
std::string status_page_dom(const std::string& page, std::string stand_ins, const std::string& backends,
                            std::chrono::milliseconds virtual_time) {
  stand_ins.replace(stand_ins.find("BACKENDS"), 8, json(backends).dump());
  const std::string script = "<script>\n\"use strict\";\n(() => {\n"
                             "  const html = document.documentElement;\n"
                             "  localStorage.removeItem(\"infergateAdminToken\");  // one left in the profile\n"
                             "  let prompts = 0;\n" +
                             stand_ins + "})();\n</script>\n";
  auto html = page;
  const auto head = html.find("<head>");
  EXPECT_NE(head, std::string::npos);
  if (head == std::string::npos) return {};
  html.insert(head + 6, script);
  static int pages = 0;
  const auto dir = std::filesystem::temp_directory_path() /
                   ("infergate-status-page-" + std::to_string(getpid()) + "-" + std::to_string(++pages));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "status.html") << html;
  const auto dom = chromium_dom("file://" + (dir / "status.html").string(), virtual_time);
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return dom;
}

}  // namespace

TEST(HealthTest, KilledBackendGoesDownThenComesBackAndGetsNoTrafficMeanwhile) {
  std::vector<Mock> mocks;
  mocks.push_back(start_mock());
  mocks.push_back(start_mock());
  const int port = mocks[1].port;
  auto gw = start_gateway(plus(backends_of(mocks), {"--set", "health.interval=200ms", "--set", "health.unhealthy_threshold=2",
                                                    "--set", "health.healthy_threshold=2"}));
  ASSERT_TRUE(poll_until([&] { return metric(gw.port, "infergate_backend_up", labels_for(mocks[1])) == 1; }, 10s));
  mocks[1].process->kill();
  const auto killed_at = Clock::now();
  // Down within unhealthy_threshold intervals (2 x 200 ms, jittered), with some slack.
  ASSERT_TRUE(poll_until([&] { return metric(gw.port, "infergate_backend_up", labels_for(mocks[1])) == 0; }, 5s));
  EXPECT_LT(Clock::now() - killed_at, 1500ms);
  EXPECT_EQ(state_of(gw.port, mocks[1].id()), "unhealthy");
  for (int i = 0; i < 6; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200);
    EXPECT_EQ(r.header("X-Backend"), mocks[0].id());
  }
  auto restarted = start_mock({"--port", std::to_string(port)});
  ASSERT_EQ(restarted.port, port);
  ASSERT_TRUE(poll_until([&] { return metric(gw.port, "infergate_backend_up", labels_for(mocks[1])) == 1; }, 5s));
  EXPECT_EQ(metric(gw.port, "infergate_backend_state", labels_for(mocks[1]) + ",state=\"healthy\""), 1);
  EXPECT_EQ(metric(gw.port, "infergate_backend_state", labels_for(mocks[1]) + ",state=\"unhealthy\""), 0);
}

TEST(HealthTest, StartingBackendStaysStartingAndGetsNoTraffic) {
  auto ready = start_mock();
  auto loading = start_mock({"--startup-delay-ms", "60000"});
  auto gw = start_gateway({"--backend", ready.url(), "--backend", loading.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, ready.id()) == "healthy"; }, 10s));
  for (int i = 0; i < 6; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    ASSERT_EQ(r.status, 200);
    EXPECT_EQ(r.header("X-Backend"), ready.id());
  }
  EXPECT_EQ(state_of(gw.port, loading.id()), "starting");
  EXPECT_EQ(posted_to(loading), 0);
  EXPECT_THAT(gw.process->errors(), ::testing::Not(HasSubstr("-> unhealthy")));  // no alarms while loading
}

TEST(HealthTest, ReadyNeedsTheMinimumOfHealthyBackends) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "health.min_healthy_backends=2"});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  auto r = http_request(gw.port, "GET", "/ready");
  EXPECT_EQ(r.status, 503);
  EXPECT_THAT(json::parse(r.body)["reason"].get<std::string>(), HasSubstr("need 2"));
  auto gw1 = start_gateway({"--backend", mock.url()});
  EXPECT_TRUE(poll_until([&] { return http_request(gw1.port, "GET", "/ready").status == 200; }, 10s));
  EXPECT_EQ(http_request(gw1.port, "GET", "/health").status, 200);
}

// A probe that timed out once (a server stuck while loading) must not make every later error on
// the probe's socket look like a timeout: a backend that closes idle connections before the
// next probe (uvicorn does after 5 s) would then alternate pass and fail, and never count as
// healthy (the reused connection's close is retried on a fresh one only when it is no timeout).
TEST(HealthTest, ABackendThatHungOnceAndClosesIdleConnectionsBecomesHealthy) {
  auto mock = start_mock({"--hang-health-ms", "1000", "--keep-alive-ms", "100"});
  auto gw = start_gateway({"--backend", mock.url(), "--set", "health.timeout=300ms", "--set", "health.interval=400ms",
                           "--set", "health.healthy_threshold=2"});
  EXPECT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 8s))
      << http_request(gw.port, "GET", "/admin/backends").body;
}

// A backend whose /v1/models nests deeper than the JSON library can write out again (it
// recurses) is not taken at its word: the gateway keeps serving, and lists none of its models.
TEST(HealthTest, AModelsListNestedTooDeepIsIgnoredNotACrash) {
  auto deep = start_mock({"--models-nesting", "200000", "--model", "deep-model"});
  auto plain = start_mock({"--model", "plain-model"});
  auto gw = start_gateway({"--backend", deep.url(), "--backend", plain.url()});
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 2; }, 10s));
  // Once the gateway has read the deep list, it must stay up.
  ASSERT_TRUE(poll_until(
      [&] { return json::parse(http_request(deep.port, "GET", "/mock/stats").body)["models_requests"] >= 1; }, 10s));
  EXPECT_FALSE(poll_until([&] { return !gw.process->running(); }, 1s)) << "the gateway died reading the deep list";
  json models;
  ASSERT_TRUE(poll_until(
      [&] {
        models = json::parse(http_request(gw.port, "GET", "/v1/models").body, nullptr, false);
        return models.is_object() && models["data"].size() == 1;
      },
      5s))
      << models.dump();
  EXPECT_EQ(models["data"][0]["id"], "plain-model");
  EXPECT_TRUE(gw.process->running());
}

// A backend host name that does not resolve is a mistake, not a server still loading: the log
// says so at once (once), and /ready's reason names the commonest probe failure.
TEST(HealthTest, AnUnresolvableBackendNameIsWarnedAboutAndShownInReady) {
  const char* asan_env = std::getenv("ASAN_OPTIONS");
  const std::string asan = asan_env != nullptr ? asan_env : "";
  auto loading = start_mock({"--startup-delay-ms", "60000"});
  // Two nodes that do not resolve (one failure, whatever the name) against one loading server.
  auto gw = start_gateway({"--backend", "http://gpu-node07.test:9000", "--backend", "http://gpu-node08.test:9000",
                           "--backend", loading.url()},
                          {"LD_PRELOAD=" INFERGATE_HANGING_RESOLVER, "IG_TEST_UNKNOWN_SUFFIX=.test",
                           "ASAN_OPTIONS=" + asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"});
  ASSERT_TRUE(poll_until([&] { return gw.process->errors().find("gpu-node07.test:9000: resolve") != std::string::npos; },
                         10s))
      << gw.process->errors();
  EXPECT_THAT(gw.process->errors(), HasSubstr("backend gpu-node07.test:9000: resolve gpu-node07.test: "));
  // A static backend's name comes from its URL, not from Slurm's node names.
  EXPECT_THAT(gw.process->errors(), HasSubstr("check the host name in its URL (backends, --backend)"));
  EXPECT_THAT(gw.process->errors(), Not(HasSubstr("slurm.domain")));
  json ready;
  ASSERT_TRUE(poll_until(
      [&] {
        ready = json::parse(http_request(gw.port, "GET", "/ready").body);
        // Both nodes probed (each backend's first probe comes at its own moment).
        const auto reason = ready["reason"].get<std::string>();
        return reason.find("last probe: resolve") != std::string::npos &&
               reason.find("(2 backend(s))") != std::string::npos;
      },
      10s));
  EXPECT_THAT(ready["reason"].get<std::string>(), HasSubstr("0 healthy backend(s) of 3, need 1 (3 starting); last probe: resolve gpu-node0"));
  EXPECT_THAT(ready["reason"].get<std::string>(), HasSubstr("(2 backend(s))"));
  // Probes go on every 100 ms (five more seen below); the warning is not repeated, and the
  // loading server raises none.
  const std::string probes = "infergate_health_probe_duration_seconds_count";
  const std::string labels = "backend=\"gpu-node07.test:9000\",node=\"gpu-node07.test\",slot=\"0\"";
  const double seen = metric(gw.port, probes, labels);
  ASSERT_TRUE(poll_until([&] { return metric(gw.port, probes, labels) >= seen + 5; }, 10s));
  const auto log = gw.process->errors();
  std::size_t warnings = 0;
  for (auto at = log.find("gpu-node07.test:9000: resolve"); at != std::string::npos;
       at = log.find("gpu-node07.test:9000: resolve", at + 1)) {
    ++warnings;
  }
  EXPECT_EQ(warnings, 1u) << log;
  EXPECT_THAT(log, HasSubstr("backend gpu-node08.test:9000: resolve gpu-node08.test: "));
  EXPECT_THAT(log, Not(HasSubstr(loading.id() + ": resolve")));
}

TEST(HealthTest, PassiveFailuresEjectButClientErrorsDoNot) {
  auto failing = start_mock({"--fail-rate", "1", "--fail-status", "500"});
  auto good = start_mock();
  auto gw = start_gateway({"--backend", failing.url(), "--backend", good.url(), "--set", "passive.failures=3",
                           "--set", "passive.ejection_base=30s", "--set", "passive.ejection_max=60s"});
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 2; }, 10s));
  // 4xx answers (bad JSON) are the client's fault: many of them never eject anything.
  for (int i = 0; i < 10; ++i) EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", "{bad").status, 400);
  EXPECT_EQ(state_of(gw.port, good.id()), "healthy");
  // 500s are the backend's: after 3 in a row it is ejected, and traffic goes to the other.
  for (int i = 0; i < 10; ++i) http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  // The router stops picking it at once (the 5xx count below); the state shown is the health
  // checker's, which applies the ejection on its own thread a moment later.
  EXPECT_TRUE(poll_until([&] { return state_of(gw.port, failing.id()) == "ejected"; }, 5s));
  EXPECT_EQ(metric(gw.port, "infergate_backend_ejections_total", labels_for(failing)), 1);
  EXPECT_EQ(metric(gw.port, "infergate_backend_requests_total", labels_for(failing) + ",code=\"5xx\""), 3);
  for (int i = 0; i < 4; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    EXPECT_EQ(r.header("X-Backend"), good.id());
  }
}

// A success counts only once the response is through, not at its head: a backend that sends
// its head and then breaks every response (here: the head, then the close, as a server dying in
// the prefill after sending its SSE head) is ejected after passive.failures like any other.
TEST(HealthTest, ResponsesThatBreakAfterTheirHeadCountAsFailures) {
  auto breaking = start_mock({"--drop-after-header"});
  auto good = start_mock();
  auto gw = start_gateway({"--backend", breaking.url(), "--backend", good.url(), "--set", "passive.failures=3",
                           "--set", "passive.ejection_base=30s", "--set", "passive.ejection_max=60s"});
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 2; }, 10s));
  // Each break comes before any body byte reached the client: retried on the other backend.
  for (int i = 0; i < 8; ++i) {
    auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(true));
    EXPECT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.header("X-Backend"), good.id());
  }
  EXPECT_TRUE(poll_until([&] { return state_of(gw.port, breaking.id()) == "ejected"; }, 5s));
  EXPECT_EQ(metric(gw.port, "infergate_backend_ejections_total", labels_for(breaking)), 1);
  EXPECT_EQ(metric(gw.port, "infergate_backend_requests_total", labels_for(breaking) + ",code=\"error\""), 3);
}

// A stream's success is reported when it ends, possibly long after its head: it must not erase
// failures reported since (they are newer news), so a backend that fails new requests while an
// older stream finishes is still ejected.
TEST(HealthTest, AStreamEndingWellDoesNotEraseFailuresThatCameAfterItsHead) {
  auto mock = start_mock({"--tokens", "40", "--token-delay-ms", "50"});  // 2 s per stream
  auto gw = start_gateway({"--backend", mock.url(), "--set", "passive.failures=3", "--set",
                           "passive.ejection_base=30s", "--set", "passive.ejection_max=60s"});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  const auto body = chat_body(true);
  RawConnection stream(gw.port);
  ASSERT_TRUE(stream.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body));
  ASSERT_TRUE(stream.read_until([](const std::string& got) { return got.find("data: ") != std::string::npos; }));
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Mock-Fail", "500"}}).status,
              500);
  }
  ASSERT_TRUE(stream.read_until([](const std::string& got) { return got.find("data: [DONE]") != std::string::npos; }));
  EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Mock-Fail", "500"}}).status,
            500);
  EXPECT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "ejected"; }, 5s));
}

// A response its client stopped taking (users stop streams routinely) showed the backend
// working: it breaks a run of failures like a success, instead of vanishing from it.
TEST(HealthTest, AStreamItsClientStoppedCountsForTheBackend) {
  auto mock = start_mock({"--tokens", "100", "--token-delay-ms", "50"});
  auto gw = start_gateway({"--backend", mock.url(), "--set", "passive.failures=3", "--set",
                           "passive.ejection_base=30s", "--set", "passive.ejection_max=60s"});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  auto fail = [&] {
    EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Mock-Fail", "500"}}).status,
              500);
  };
  fail();
  fail();
  {
    const auto body = chat_body(true);
    RawConnection stream(gw.port);
    ASSERT_TRUE(stream.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body));
    ASSERT_TRUE(stream.read_until([](const std::string& got) { return got.find("data: ") != std::string::npos; }));
  }  // the client stops the stream
  ASSERT_TRUE(poll_until([&] { return json::parse(http_request(mock.port, "GET", "/mock/stats").body)["cancelled"] == 1; },
                         5s));
  fail();
  // Two failures, a working stream, one failure: not three in a row.
  EXPECT_EQ(state_of(gw.port, mock.id()), "healthy");
  fail();
  fail();
  EXPECT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "ejected"; }, 5s));
}

// A backend that fails again soon after each return (a flapping one) is let back for ever
// shorter spells: the ejection backoff doubles across incidents even with successes between
// them; only serving passive.ejection_max without an ejection starts it again at the base (unit
// tested: HealthStateTest). (The base time is long enough for a loaded machine to send the
// request that must find the backend ejected before the ejection ends.)
TEST(HealthTest, AFlappingBackendsEjectionsGrowDespiteSuccessesBetweenThem) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "passive.failures=2", "--set",
                           "passive.ejection_base=2s", "--set", "passive.ejection_max=60s", "--set",
                           "health.interval=100ms", "--set", "health.healthy_threshold=1"});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  auto incident = [&] {
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {{"X-Mock-Fail", "500"}}).status,
                500);
    }
    // Its only backend being ejected (at once or a moment later): 503 with Retry-After, the
    // same as with no healthy backend, never a 502 "after 0 attempts".
    auto during = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
    EXPECT_EQ(during.status, 503) << during.body;
    EXPECT_FALSE(during.header("Retry-After").empty());
    EXPECT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "ejected"; }, 5s));
    EXPECT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 15s));
  };
  incident();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
  incident();
  const auto log = gw.process->errors();
  std::size_t base_ejections = 0;
  for (auto at = log.find("ejected for 2000ms"); at != std::string::npos; at = log.find("ejected for 2000ms", at + 1)) {
    ++base_ejections;
  }
  EXPECT_EQ(base_ejections, 1u) << log;
  EXPECT_THAT(log, HasSubstr("ejected for 4000ms"));
}

// With every backend drained, the answers say so: a 503 and a not-ready /ready that only said
// "none ... is healthy" sent operators looking for a broken server.
TEST(AdminTest, DrainingEveryBackendIsWhatTheAnswersSay) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, a.id()) == "healthy"; }, 10s));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + a.id() + "/drain").status, 200);
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 503);
  EXPECT_THAT(r.body, HasSubstr("none of the 1 backends is healthy now (1 draining); retry shortly"));
  auto ready = http_request(gw.port, "GET", "/ready");
  EXPECT_EQ(ready.status, 503);
  EXPECT_THAT(ready.body, HasSubstr("0 healthy backend(s) of 1, need 1 (1 draining)"));
}

TEST(AdminTest, AddDrainUndrainRemoveRoundTrip) {
  auto a = start_mock();
  auto b = start_mock({"--model", "other-model"});
  auto gw = start_gateway({"--backend", a.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, a.id()) == "healthy"; }, 10s));

  auto added = http_request(gw.port, "POST", "/admin/backends", json{{"url", b.url()}}.dump());
  ASSERT_EQ(added.status, 201) << added.body << added.error << gw.process->errors();
  EXPECT_EQ(json::parse(added.body)["source"], "admin");
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, b.id()) == "healthy"; }, 10s));

  // /v1/models: the union of the healthy backends' models.
  ASSERT_TRUE(poll_until(
      [&] {
        auto models = json::parse(http_request(gw.port, "GET", "/v1/models").body);
        return models["object"] == "list" && models["data"].size() == 2;
      },
      5s));
  // Each model as its backend describes it (vLLM's objects carry max_model_len and root, which
  // trainers read), not a stand-in the gateway made up.
  const auto listed = json::parse(http_request(gw.port, "GET", "/v1/models").body);
  ASSERT_EQ(listed["data"].size(), 2u) << listed.dump();
  for (const auto& m : listed["data"]) {
    EXPECT_EQ(m["object"], "model") << m.dump();
    EXPECT_EQ(m["owned_by"], "infergate-mock") << m.dump();
    EXPECT_EQ(m["max_model_len"], 32768) << m.dump();
    EXPECT_EQ(m["root"], m["id"]) << m.dump();
    EXPECT_GT(m["created"].get<long>(), 0) << m.dump();
  }

  auto drained = http_request(gw.port, "POST", "/admin/backends/" + b.id() + "/drain");
  EXPECT_EQ(drained.status, 200) << drained.error << gw.process->errors();
  EXPECT_EQ(json::parse(drained.body)["state"], "draining");
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).header("X-Backend"), a.id());
  }
  auto undrained = http_request(gw.port, "POST", "/admin/backends/" + b.id() + "/undrain");
  EXPECT_EQ(json::parse(undrained.body)["state"], "healthy");

  auto removed = http_request(gw.port, "DELETE", "/admin/backends/" + b.id());
  EXPECT_EQ(removed.status, 202);
  // The answer's state and its removal note agree, however fast the idle backend went.
  const auto answer = json::parse(removed.body);
  EXPECT_EQ(answer["removal"] == "removed (it was idle)", answer["state"] == "removed") << removed.body;
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, b.id()) == "absent"; }, 5s));

  // Bad input: clear 4xx answers in the OpenAI error shape.
  auto bad_json = http_request(gw.port, "POST", "/admin/backends", "{oops");
  EXPECT_EQ(bad_json.status, 400);
  EXPECT_THAT(json::parse(bad_json.body)["error"]["message"].get<std::string>(), HasSubstr("JSON"));
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends", R"({"url":"ftp://x:1"})").status, 400);
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends", R"({"url":"http://nohost"})").status, 400);
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends/nope:1/drain").status, 404);
  EXPECT_EQ(http_request(gw.port, "DELETE", "/admin/backends/nope:1").status, 404);
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends/" + a.id() + "/explode").status, 404);
}

TEST(AdminTest, TokenProtectsTheAdminApi) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()}, {"INFERGATE_ADMIN_TOKEN=s3cret"});
  auto denied = http_request(gw.port, "GET", "/admin/backends");
  EXPECT_EQ(denied.status, 401);
  EXPECT_EQ(json::parse(denied.body)["error"]["code"], 401);
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends", "", {{"Authorization", "Bearer wrong"}}).status, 401);
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends", "", {{"Authorization", "Bearer s3cret"}}).status, 200);
  // The scheme is case-insensitive; the token is not.
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends", "", {{"Authorization", "bearer s3cret"}}).status, 200);
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends", "", {{"Authorization", "Bearer S3CRET"}}).status, 401);
  // One or more spaces after the scheme.
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends", "", {{"Authorization", "Bearer   s3cret"}}).status, 200);
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends", "", {{"Authorization", "Bearer"}}).status, 401);
  // A percent-encoded id (the colon) names the same backend.
  auto encoded = a.id();
  encoded.replace(encoded.find(':'), 1, "%3A");
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends/" + encoded, "", {{"Authorization", "Bearer s3cret"}}).status,
            200);
}

// JSON nested 200,000 deep used to overflow the stack when written back out (a crash from one
// admin call); a huge body took gigabytes to parse. Both are refused, and serving goes on.
TEST(AdminTest, DeeplyNestedOrHugeAdminBodiesAreRefusedAndTheGatewayLives) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url(), "--set", "limits.max_body=64MiB"});
  const std::string deep = R"({"path":"/v1/completions","body":)" + std::string(200000, '[') + std::string(200000, ']') + "}";
  auto r = http_request(gw.port, "POST", "/admin/broadcast", deep);
  EXPECT_EQ(r.status, 400) << r.error;
  EXPECT_THAT(r.body, HasSubstr("deeper than 64 levels"));
  auto nested_object = http_request(gw.port, "POST", "/admin/backends", std::string(100000, '{'));
  EXPECT_EQ(nested_object.status, 400);
  auto huge = http_request(gw.port, "POST", "/admin/backends", "{\"url\":\"" + std::string(20 << 20, 'a') + "\"}");
  EXPECT_EQ(huge.status, 413);
  EXPECT_THAT(huge.body, HasSubstr("at most 16 MiB"));
  // A long value is quoted shortened in the error, not echoed whole.
  auto long_url = http_request(gw.port, "POST", "/admin/backends", json{{"url", "http://" + std::string(100000, 'h')}}.dump());
  EXPECT_EQ(long_url.status, 400);
  EXPECT_LT(long_url.body.size(), 4096u);
  EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);
  EXPECT_TRUE(gw.process->running());
}

// Text that is not JSON at all is told apart from JSON of the wrong shape: the fix differs.
TEST(AdminTest, AnAdminBodyThatIsNotJsonSaysSo) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  for (const std::string path : {"/admin/backends", "/admin/broadcast"}) {
    SCOPED_TRACE(path);
    auto bad = http_request(gw.port, "POST", path, "{bad");
    EXPECT_EQ(bad.status, 400);
    EXPECT_THAT(json::parse(bad.body)["error"]["message"].get<std::string>(),
                HasSubstr("request body is not valid JSON"));
    auto empty = http_request(gw.port, "POST", path, "");
    EXPECT_THAT(json::parse(empty.body)["error"]["message"].get<std::string>(),
                HasSubstr("request body is not valid JSON"));
    auto array = http_request(gw.port, "POST", path, R"(["http://127.0.0.1:1"])");
    EXPECT_EQ(array.status, 400);
    EXPECT_THAT(json::parse(array.body)["error"]["message"].get<std::string>(),
                HasSubstr("request body must be a JSON object"));
  }
}

// A URL whose host is no host name (the rules Slurm hosts and static backends follow) is
// refused with the reason, not added as a backend that can never resolve.
TEST(AdminTest, AnAddedBackendsHostMustBeAValidHostName) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"http://a..b:80", "not a valid host name: empty label"},
      {"http://" + std::string(300, 'a') + ":80", "not a valid host name: 300 characters long, more than 253"},
      {"http://" + std::string(64, 'a') + ".b:80", "not a valid host name: label at offset 0 is 64 characters"},
      {"http://127.0.0.01:80", "must be a dotted quad"},
      {"http://1.2.3:80", "must be a dotted quad"},
      {"http://-a:80", "not a valid host name: label '-a' at offset 0 starts with '-'"},
      // What is wrong with a port is named.
      {"http://127.0.0.1", "no port: expected http://host:port"},
      {"http://[::1]", "no port"},
      {"http://127.0.0.1:0", "port 0 is no backend's port (1-65535)"},
      {"http://127.0.0.1:65536", "port '65536' is not a number from 1 to 65535"},
      {"http://127.0.0.1:-1", "port '-1' is not a number from 1 to 65535"},
      {"http://::1:80", "an IPv6 address goes in brackets"},
      // A bad host or a path is named as such, not blamed on the port.
      {"http://gpu*01:8000", "not a valid host name: character '*' at offset 3"},
      {"http://user@host:8000", "not a valid host name: character '@'"},
      {"http://host:8000/v1", "without a path ('/v1')"},
      {"http://[::1]x:80", "expected ':port' right after the IPv6 address's ']'"},
      {"http://host]:80", "not a valid host name: character ']' at offset 4"},
      {"http://:80", "no host: expected http://host:port"},
      // A control character is shown escaped, and the message goes on past it (a NUL ended it).
      {std::string("http://127.0.0.1:1\0", 19), "backend URL 'http://127.0.0.1:1\\x00': port '1\\x00' is not a number"},
  };
  for (const auto& [url, problem] : cases) {
    auto r = http_request(gw.port, "POST", "/admin/backends", json{{"url", url}}.dump());
    EXPECT_EQ(r.status, 400) << url << ": " << r.body;
    EXPECT_THAT(json::parse(r.body)["error"]["message"].get<std::string>(), HasSubstr(problem)) << url;
  }
  EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends/a..b:80").status, 404);
  auto fine = http_request(gw.port, "POST", "/admin/backends", json{{"url", "http://127.0.0.1:1"}}.dump());
  EXPECT_EQ(fine.status, 201) << fine.body;
}

// One server is one backend however its URL is written: the scheme and host names in any case,
// an IPv6 address in any of its forms. Each spelling got a backend of its own, and with it a
// share of the round robin.
TEST(AdminTest, OneServerWrittenTwoWaysIsAddedOnce) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  const std::vector<std::pair<std::string, std::string>> spellings = {
      {"http://localhost:1", "HTTP://LocalHost:1/"},
      {"http://[::1]:2", "http://[0:0:0:0:0:0:0:1]:2"},
      {"http://[2001:db8::1]:3", "http://[2001:DB8:0::0:1]:3"},
  };
  for (const auto& [first, second] : spellings) {
    auto added = http_request(gw.port, "POST", "/admin/backends", json{{"url", first}}.dump());
    EXPECT_EQ(added.status, 201) << first << ": " << added.body;
    auto again = http_request(gw.port, "POST", "/admin/backends", json{{"url", second}}.dump());
    EXPECT_EQ(again.status, 200) << second << ": " << again.body;
    EXPECT_EQ(json::parse(again.body)["id"], json::parse(added.body)["id"]) << second;
  }
  EXPECT_EQ(admin_backends(gw.port)["backends"].size(), 4u);
  EXPECT_EQ(json::parse(http_request(gw.port, "GET", "/admin/backends/[2001:db8::1]:3").body)["id"], "[2001:db8::1]:3");
  // Its id found as its URL was written too.
  EXPECT_EQ(json::parse(http_request(gw.port, "GET", "/admin/backends/[2001:DB8:0::1]:3").body)["id"], "[2001:db8::1]:3");
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends/LocalHost:1/drain").status, 200);
  EXPECT_EQ(http_request(gw.port, "DELETE", "/admin/backends/LOCALHOST:1").status, 202);
}

// Reading the admin API: HEAD is GET without the body, and a read is not traffic in flight, so
// the status page, which polls GET /admin/backends, does not show its own poll as "1 in flight".
TEST(AdminTest, ReadsAnswerHeadAndAreNotCountedInFlight) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, a.id()) == "healthy"; }, 10s));
  for (const auto& target : std::vector<std::string>{"/admin/backends", "/admin/backends/" + a.id()}) {
    const auto head = raw_exchange(gw.port, "HEAD " + target + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    EXPECT_THAT(head, StartsWith("HTTP/1.1 200 ")) << target << ": " << head;
    EXPECT_TRUE(head.ends_with("\r\n\r\n")) << target << ": " << head;  // no body
  }
  const auto refused = http_request(gw.port, "PUT", "/admin/backends");
  EXPECT_EQ(refused.status, 405);
  EXPECT_EQ(refused.header("Allow"), "GET, HEAD, POST");
  // The PUT (a call that would change something) counts in flight until its worker is done with
  // it, which may be just after its client read the answer; a read that counted itself would
  // never see 0.
  EXPECT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["inflight"] == 0; }, 5s));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(admin_backends(gw.port)["gateway"]["inflight"], 0);
}

// Concurrent adds of one URL make one backend, probed once: one 201, the others 200.
TEST(AdminTest, ConcurrentAddsOfOneUrlAddItOnce) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  // Every round's mock stays up to the end: a new one could otherwise get the port, and so the
  // URL, of one an earlier round added (then every add answers 200).
  std::vector<Mock> extras;
  for (int round = 0; round < 10; ++round) {
    const auto& extra = extras.emplace_back(start_mock());
    std::vector<int> statuses(4);
    std::vector<std::thread> adders;
    for (int i = 0; i < 4; ++i) {
      adders.emplace_back([&, i] {
        statuses[i] = http_request(gw.port, "POST", "/admin/backends", json{{"url", extra.url()}}.dump()).status;
      });
    }
    for (auto& t : adders) t.join();
    EXPECT_EQ(std::count(statuses.begin(), statuses.end(), 201), 1);
    EXPECT_EQ(std::count(statuses.begin(), statuses.end(), 200), 3);
  }
}

// An add right after a DELETE either cancels the removal or adds the backend anew: it never
// answers success for a backend that is then gone. (The add and the removal now run as one step
// on the health checker's thread; the race they had cannot be timed from outside, so this checks
// the behaviour around it.)
TEST(AdminTest, AnAddRightAfterARemovalLeavesTheBackendPresent) {
  auto a = start_mock();
  auto b = start_mock();
  auto gw = start_gateway({"--backend", a.url(), "--backend", b.url()});
  for (int round = 0; round < 60; ++round) {
    EXPECT_EQ(http_request(gw.port, "DELETE", "/admin/backends/" + b.id()).status, 202);
    auto added = http_request(gw.port, "POST", "/admin/backends", json{{"url", b.url()}}.dump());
    ASSERT_TRUE(added.status == 200 || added.status == 201) << added.status << " " << added.body;
    EXPECT_NE(json::parse(added.body)["state"], "removed") << "round " << round;
    EXPECT_EQ(http_request(gw.port, "GET", "/admin/backends/" + b.id()).status, 200) << "round " << round;
  }
}

// A removed backend keeps no connection from the gateway: its idle pooled connections are
// closed within about a second, not after limits.upstream_idle_timeout (1 minute here).
TEST(AdminTest, ARemovedBackendsPooledConnectionsAreClosed) {
  auto a = start_mock();
  auto b = start_mock();
  auto gw = start_gateway({"--backend", a.url(), "--backend", b.url(), "--set", "limits.upstream_idle_timeout=1m"});
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 2; }, 10s));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
  auto open_on_b = [&] { return json::parse(http_request(b.port, "GET", "/mock/stats").body)["open_connections"].get<int>(); };
  ASSERT_GT(open_on_b(), 1);  // probes, and the pooled connections of its requests
  ASSERT_EQ(http_request(gw.port, "DELETE", "/admin/backends/" + b.id()).status, 202);
  ASSERT_TRUE(poll_until([&] { return http_request(gw.port, "GET", "/admin/backends/" + b.id()).status == 404; }, 5s));
  // Our own stats request is the one connection left.
  EXPECT_TRUE(poll_until([&] { return open_on_b() == 1; }, 5s)) << open_on_b();
}

// Every worker walks the registry's backends about once a second (to close pooled connections to
// removed ones); a state change published on the health checker's thread afterwards frees the
// list it walked. A TSan build reported that walk of a snapshot nobody held as a race.
TEST(AdminTest, StateChangesAfterTheWorkersWalkedTheBackendsAreNoRace) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "limits.upstream_idle_timeout=100ms"});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  auto open_on_mock = [&] {
    return json::parse(http_request(mock.port, "GET", "/mock/stats").body)["open_connections"]
        .get<int>();
  };
  // A pooled connection closed after its idle timeout shows a walk: twice, so that every worker
  // (they start together) has walked the current list.
  for (int round = 0; round < 2; ++round) {
    ASSERT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
    const int with_pooled = open_on_mock();
    ASSERT_TRUE(poll_until([&] { return open_on_mock() < with_pooled; }, 5s));
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends/" + mock.id() + "/drain").status, 200);
    EXPECT_EQ(http_request(gw.port, "POST", "/admin/backends/" + mock.id() + "/undrain").status,
              200);
  }
  // ~Gateway fails the test if the gateway's sanitizer reported anything.
}

// With every backend removed through the admin API, a request gets 503 with Retry-After and a
// message that says so (not the discovery summary from start-up), and adding one back serves.
TEST(AdminTest, RemovingEveryBackendAnswers503UntilOneIsAddedBack) {
  auto a = start_mock();
  auto gw = start_gateway({"--backend", a.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, a.id()) == "healthy"; }, 10s));
  ASSERT_EQ(http_request(gw.port, "DELETE", "/admin/backends/" + a.id()).status, 202);
  ASSERT_TRUE(poll_until([&] { return http_request(gw.port, "GET", "/admin/backends/" + a.id()).status == 404; }, 5s));
  auto r = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.header("Retry-After"), "5");
  EXPECT_THAT(r.body, HasSubstr("every one was removed through the admin API"));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends", json{{"url", a.url()}}.dump()).status, 201);
  EXPECT_TRUE(poll_until(
      [&] { return http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status == 200; }, 10s));
}

// A backend that is not healthy is not sent the broadcast, and the answer says so: it missed
// what the others got (a weight update, say).
TEST(AdminTest, ABroadcastListsTheBackendsItSkipped) {
  auto a = start_mock();
  auto b = start_mock();
  auto gw = start_gateway({"--backend", a.url(), "--backend", b.url()});
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 2; }, 10s));
  ASSERT_EQ(http_request(gw.port, "POST", "/admin/backends/" + b.id() + "/drain").status, 200);
  auto r = http_request(gw.port, "POST", "/admin/broadcast", json{{"method", "GET"}, {"path", "/v1/models"}}.dump());
  EXPECT_EQ(r.status, 207) << r.body;
  auto j = json::parse(r.body);
  EXPECT_EQ(j["ok"], false);
  ASSERT_EQ(j["results"].size(), 2u);
  std::map<std::string, json> by_backend;
  for (const auto& item : j["results"]) by_backend[item["backend"]] = item;
  EXPECT_EQ(by_backend[a.id()]["status"], 200);
  EXPECT_EQ(by_backend[b.id()]["skipped"], "draining");
}

TEST(AdminTest, BroadcastReachesEveryHealthyBackend) {
  std::vector<Mock> mocks;
  for (int i = 0; i < 4; ++i) mocks.push_back(start_mock());
  auto gw = start_gateway(backends_of(mocks));
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 4; }, 10s));
  auto r = http_request(gw.port, "POST", "/admin/broadcast",
                        json{{"method", "POST"}, {"path", "/v1/completions"},
                             {"body", {{"model", "mock-model"}, {"prompt", "update"}, {"max_tokens", 1}}}}
                            .dump());
  ASSERT_EQ(r.status, 200) << r.body;
  auto j = json::parse(r.body);
  ASSERT_EQ(j["results"].size(), 4u);
  std::set<std::string> reached;
  for (const auto& result : j["results"]) {
    EXPECT_EQ(result["status"], 200);
    EXPECT_EQ(result["body"]["object"], "text_completion");
    reached.insert(result["backend"]);
  }
  EXPECT_EQ(reached.size(), 4u);
  for (const auto& m : mocks) EXPECT_EQ(posted_to(m), 1);
  EXPECT_EQ(http_request(gw.port, "POST", "/admin/broadcast", R"({"method":"POST"})").status, 400);
  // A value of the wrong type is a 400 with an error body, not a dropped connection.
  auto typed = http_request(gw.port, "POST", "/admin/broadcast", R"({"method":5,"path":"/x"})");
  EXPECT_EQ(typed.status, 400) << typed.error;
  EXPECT_TRUE(json::parse(typed.body, nullptr, false).contains("error")) << typed.body;
  // The path becomes each backend's request line: one that would smuggle a second request in is
  // refused, and no backend sees anything.
  const json smuggler = {{"method", "POST"},
                         {"path", "/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nPOST /v1/smuggled"},
                         {"body", {{"a", 1}}}};
  auto refused = http_request(gw.port, "POST", "/admin/broadcast", smuggler.dump());
  EXPECT_EQ(refused.status, 400);
  EXPECT_THAT(refused.body, HasSubstr("visible ASCII"));
  for (const auto& m : mocks) EXPECT_EQ(posted_to(m), 1);
  // "body": null is no body, as if it were left out (the mock's /echo answers what it got).
  auto no_body = http_request(gw.port, "POST", "/admin/broadcast", R"({"path":"/echo","body":null})");
  ASSERT_EQ(no_body.status, 200) << no_body.body;
  const auto echoed = json::parse(no_body.body);
  ASSERT_EQ(echoed["results"].size(), 4u) << no_body.body;
  for (const auto& result : echoed["results"]) EXPECT_EQ(result["body"], "") << no_body.body;
}

// A retried request's time to first token belongs to the backend that answered, from its own
// attempt: the seconds lost on a failing backend first are not the healthy one's.
TEST(MetricsTest, BackendLatencyCountsFromItsOwnAttempt) {
  auto dying = start_mock({"--drop-request", "--drop-delay-ms", "800"});
  auto good = start_mock();
  auto gw = start_gateway({"--backend", dying.url(), "--backend", good.url(), "--set", "passive.failures=1000"});
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 2; }, 10s));
  for (int i = 0; i < 2; ++i) {  // round robin: at least one starts on the dying backend
    auto r = http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 10s);
    ASSERT_EQ(r.status, 200);
    EXPECT_EQ(r.headers["x-backend"], good.id());
  }
  EXPECT_EQ(metric(gw.port, "infergate_backend_ttft_seconds_count", labels_for(good)), 2);
  EXPECT_LT(metric(gw.port, "infergate_backend_ttft_seconds_sum", labels_for(good)), 0.5);
}

// SIGHUP (a lost terminal) must not end the gateway and its streams: not even one that comes
// right after the listening line, before the server's handler is installed.
TEST(ShutdownTest, SighupIsIgnoredAndServingGoesOn) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url()});
  ASSERT_EQ(::kill(gw.process->pid(), SIGHUP), 0);  // at once: possibly before the handler
  EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);
  EXPECT_TRUE(gw.process->running());
  ASSERT_EQ(::kill(gw.process->pid(), SIGHUP), 0);  // while serving: the handler logs it
  EXPECT_TRUE(poll_until([&] { return gw.process->errors().find("SIGHUP: ignored") != std::string::npos; }, 5s));
  EXPECT_TRUE(gw.process->running());
  EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);
}

// A removal waits for the backend's in-flight requests; adding the backend again (or undraining
// it) meanwhile keeps it, instead of the operator's add being undone a moment later.
TEST(AdminTest, AddingABackendBackDuringItsRemovalKeepsIt) {
  auto slow = start_mock({"--tokens", "20", "--token-delay-ms", "50"});
  auto gw = start_gateway({"--backend", slow.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, slow.id()) == "healthy"; }, 10s));
  std::thread stream([&] { http_stream(gw.port, "POST", "/v1/chat/completions", chat_body(true), 10s); });
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["backends"][0]["inflight"] == 1; }, 5s));
  EXPECT_EQ(http_request(gw.port, "DELETE", "/admin/backends/" + slow.id()).status, 202);
  auto again = http_request(gw.port, "POST", "/admin/backends", json{{"url", slow.url()}}.dump());
  EXPECT_EQ(again.status, 200) << again.body;
  EXPECT_TRUE(poll_until([&] { return gw.process->errors().find("removal cancelled") != std::string::npos; }, 5s));
  stream.join();
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["backends"][0]["inflight"] == 0; }, 5s));
  std::this_thread::sleep_for(300ms);  // deliberate: several turns of the removal's 50 ms check
  EXPECT_EQ(state_of(gw.port, slow.id()), "healthy");
  EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
}

// A backend removed while a request that failed on it waits to retry elsewhere: the retry is
// counted against it after the pause, by when the registry and its probe loop have let go of
// it, so the request must keep it alive (an ASan build reported a use after free there).
TEST(AdminTest, ABackendRemovedWhileARequestWaitsToRetryOutlivesTheRetryCount) {
  auto dropping = start_mock({"--drop-request", "--drop-delay-ms", "500"});
  auto good = start_mock();
  // The pause (half to all of backoff_base) outlasts the removal's 50 ms check and the end of
  // the backend's probe loop (one health.interval).
  auto gw = start_gateway({"--backend", dropping.url(), "--backend", good.url(), "--set",
                           "retries.backoff_base=1s", "--set", "retries.backoff_max=1s"});
  ASSERT_TRUE(poll_until(
      [&] {
        return state_of(gw.port, dropping.id()) == "healthy" &&
               state_of(gw.port, good.id()) == "healthy";
      },
      10s));
  HttpResult answer;
  std::thread client([&] {
    answer = http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false), {}, 15s);
  });
  // The first pick is the first backend listed.
  const bool on_dropping =
      poll_until([&] { return admin_backends(gw.port)["backends"][0]["inflight"] == 1; }, 5s);
  EXPECT_TRUE(on_dropping);
  EXPECT_EQ(http_request(gw.port, "DELETE", "/admin/backends/" + dropping.id()).status, 202);
  client.join();
  ASSERT_TRUE(on_dropping);
  EXPECT_EQ(answer.status, 200) << answer.error << answer.body;
  EXPECT_EQ(answer.header("X-Backend"), good.id());
  EXPECT_EQ(state_of(gw.port, dropping.id()), "absent");
  EXPECT_EQ(metric(gw.port, "infergate_backend_requests_total", labels_for(good) + ",code=\"2xx\""),
            1);
}

TEST(MetricsTest, LiveScrapePassesPromtool) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url()});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false));
  http_request(gw.port, "POST", "/v1/chat/completions", chat_body(true, R"("stream_options":{"include_usage":true})"));
  auto scrape = http_request(gw.port, "GET", "/metrics");
  ASSERT_EQ(scrape.status, 200);
  EXPECT_THAT(scrape.header("Content-Type"), HasSubstr("text/plain"));
  for (auto name : {"infergate_backend_up", "infergate_backend_state", "infergate_backend_inflight",
                    "infergate_backend_requests_total", "infergate_backend_request_duration_seconds_bucket",
                    "infergate_backend_ttft_seconds_count", "infergate_backend_retries_total",
                    "infergate_backend_ejections_total", "infergate_backend_tokens_total",
                    "infergate_health_probe_duration_seconds_count", "infergate_requests_total",
                    "infergate_client_connections", "infergate_request_body_bytes",
                    "infergate_request_body_bytes_limit", "infergate_build_info"}) {
    EXPECT_THAT(scrape.body, HasSubstr(name));
  }
  // Tokens from `usage` (mock: 2 prompt words, 16 completion tokens per response). An exchange
  // is counted once its last byte is out, so the client may scrape a moment before that.
  const auto completion = labels_for(mock) + ",kind=\"completion\"";
  poll_until([&] { return metric(gw.port, "infergate_backend_tokens_total", completion) == 32; }, 5s);
  EXPECT_EQ(metric(gw.port, "infergate_backend_tokens_total", completion), 32);
  EXPECT_EQ(metric(gw.port, "infergate_backend_ttft_seconds_count", labels_for(mock)), 1);

  if (access("/usr/bin/promtool", X_OK) != 0) GTEST_SKIP() << "promtool (Debian package prometheus) is not installed";
  auto path = std::filesystem::temp_directory_path() / ("infergate-metrics-" + std::to_string(getpid()) + ".txt");
  std::ofstream(path) << scrape.body;
  Process promtool("/bin/sh", {"-c", "promtool check metrics < " + path.string() + " && echo PROMTOOL_OK"});
  EXPECT_NO_THROW(promtool.wait_for_line(std::regex("PROMTOOL_OK"), 20s)) << promtool.errors();
  std::filesystem::remove(path);
}

// infergate_requests_total counts what the gateway refuses itself (malformed HTTP, oversized
// bodies, unknown paths), and neither it nor infergate_inflight_requests counts scrapes and probes
// (a scrape used to see itself in flight).
TEST(MetricsTest, RequestsTotalCountsTheGatewaysOwnRefusalsAndNotScrapes) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "limits.max_body=1KiB"});
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mock.id()) == "healthy"; }, 10s));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(http_request(gw.port, "GET", "/health").status, 200);
    EXPECT_EQ(http_request(gw.port, "GET", "/ready").status, 200);
  }
  // A scrape that counted itself would never read 0. An admin call (the state polls above) is
  // in flight until its worker is done with it, which may be just after its client read it.
  EXPECT_TRUE(poll_until(
      [&] { return http_request(gw.port, "GET", "/metrics").body.find("\ninfergate_inflight_requests 0\n") != std::string::npos; },
      5s));
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"2xx\""), 0);
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"4xx\""), 0);

  EXPECT_THAT(raw_exchange(gw.port, "NOT HTTP AT ALL\r\n\r\n"), StartsWith("HTTP/1.1 400 "));
  EXPECT_THAT(raw_exchange(gw.port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"),
              StartsWith("HTTP/1.1 413 "));
  EXPECT_EQ(http_request(gw.port, "GET", "/no/such/path").status, 404);
  EXPECT_EQ(http_request(gw.port, "POST", "/v1/chat/completions", chat_body(false)).status, 200);
  // An exchange is counted once its last byte is out: the client may scrape before that.
  EXPECT_TRUE(poll_until([&] { return metric(gw.port, "infergate_requests_total", "code=\"4xx\"") == 3; }, 5s));
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"4xx\""), 3);
  EXPECT_TRUE(poll_until([&] { return metric(gw.port, "infergate_requests_total", "code=\"2xx\"") == 1; }, 5s));
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"2xx\""), 1);
}

TEST(StatusPageTest, HeadlessChromiumSeesOneRowPerBackendAndAnUnhealthyOne) {
  std::vector<Mock> mocks;
  for (int i = 0; i < 3; ++i) mocks.push_back(start_mock());
  // Three failed probes in a row before a backend turns unhealthy: one probe slowed down by a
  // loaded machine must not flip a row while the page is read.
  auto gw = start_gateway(
      plus(backends_of(mocks), {"--set", "health.interval=200ms", "--set", "health.unhealthy_threshold=3"}));
  ASSERT_TRUE(poll_until([&] { return admin_backends(gw.port)["gateway"]["healthy"] == 3; }, 10s));
  auto page = http_request(gw.port, "GET", "/");
  ASSERT_EQ(page.status, 200);
  EXPECT_THAT(page.header("Content-Type"), HasSubstr("text/html"));
  EXPECT_THAT(page.body, ::testing::Not(HasSubstr("http://")));   // no external assets
  EXPECT_THAT(page.body, ::testing::Not(HasSubstr("https://")));

  if (access("/usr/bin/chromium", X_OK) != 0) GTEST_SKIP() << "chromium (Debian package) is not installed";
  auto dump_dom = [&] { return chromium_dom("http://127.0.0.1:" + std::to_string(gw.port) + "/"); };
  auto count_rows = [](const std::string& dom, const std::string& state) {
    std::regex row("<tr class=\"backend\" data-id=\"[^\"]+\" data-state=\"" + state + "\"");
    return std::distance(std::sregex_iterator(dom.begin(), dom.end(), row), std::sregex_iterator());
  };
  auto dom = dump_dom();
  EXPECT_EQ(count_rows(dom, "[a-z]+"), 3) << dom.substr(0, 2000);
  EXPECT_EQ(count_rows(dom, "healthy"), 3);

  mocks[2].process->kill();
  ASSERT_TRUE(poll_until([&] { return state_of(gw.port, mocks[2].id()) == "unhealthy"; }, 5s));
  dom = dump_dom();
  EXPECT_EQ(count_rows(dom, "unhealthy"), 1);
  EXPECT_THAT(dom, HasSubstr("data-id=\"" + mocks[2].id() + "\" data-state=\"unhealthy\""));
}

// A cancelled admin token prompt is not asked again on every refresh (it came back each second
// and left the operator no way out): the page says the token is needed and asks again only when
// its button is clicked. Headless Chromium cannot answer a prompt, so the served page runs with
// prompt() and fetch() stood in for: fetch answers as the gateway did (401 without the token, its
// /admin/backends with it).
TEST(StatusPageTest, ACancelledTokenPromptWaitsForTheButton) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "admin.token=secret"});
  const auto backends = authorized_backends(gw.port);
  ASSERT_EQ(http_request(gw.port, "GET", "/admin/backends").status, 401);
  auto page = http_request(gw.port, "GET", "/");
  ASSERT_EQ(page.status, 200);
  if (access("/usr/bin/chromium", X_OK) != 0) GTEST_SKIP() << "chromium (Debian package) is not installed";

  const std::string stand_ins = R"(
  let answer = null;  // a cancel, until the button is clicked
  window.prompt = () => { html.dataset.prompts = ++prompts; return answer; };
  window.fetch = async (url, options) => {
    const authorized = options.headers.Authorization === "Bearer secret";
    return new Response(authorized ? BACKENDS : "{}", { status: authorized ? 200 : 401 });
  };
  // Three refreshes after the first: record what the operator sees, then click the button.
  setTimeout(() => {
    const auth = document.getElementById("auth");
    html.dataset.beforeClick = prompts + (auth && !auth.hidden ? " prompt(s), message shown" : " prompt(s), no message");
    answer = "secret";
    const button = document.getElementById("enter-token");
    if (button) button.click();
  }, 3500);
)";
  const auto dom = status_page_dom(page.body, stand_ins, backends, 6s);
  EXPECT_THAT(dom, HasSubstr("data-before-click=\"1 prompt(s), message shown\"")) << dom.substr(0, 2000);
  // The button asked once more, the token was taken, and the backends are shown.
  EXPECT_THAT(dom, HasSubstr("data-prompts=\"2\""));
  EXPECT_THAT(dom, HasSubstr("<tr class=\"backend\" data-id=\"" + mock.id() + "\" data-state=\"healthy\""));
  EXPECT_THAT(dom, HasSubstr("<div id=\"auth\" hidden=\"\">"));
}

// Refreshes overlap when the gateway answers slower than the page's 1 s tick: one sent before the
// token was entered must not prompt again when its 401 comes back.
TEST(StatusPageTest, AnAnswerToARefreshSentBeforeTheTokenDoesNotPromptAgain) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "admin.token=secret"});
  const auto backends = authorized_backends(gw.port);
  auto page = http_request(gw.port, "GET", "/");
  ASSERT_EQ(page.status, 200);
  if (access("/usr/bin/chromium", X_OK) != 0) GTEST_SKIP() << "chromium (Debian package) is not installed";

  const std::string stand_ins = R"(
  window.prompt = () => { html.dataset.prompts = ++prompts; return "secret"; };
  // A slow gateway for requests without the token: each 401 comes 1.5 s later, so the second
  // refresh (sent at 1 s, before the token) is answered after the token was entered.
  window.fetch = async (url, options) => {
    const authorized = options.headers.Authorization === "Bearer secret";
    if (!authorized) await new Promise((done) => setTimeout(done, 1500));
    return new Response(authorized ? BACKENDS : "{}", { status: authorized ? 200 : 401 });
  };
  setTimeout(() => { html.dataset.done = prompts; }, 4000);
)";
  const auto dom = status_page_dom(page.body, stand_ins, backends, 6s);
  EXPECT_THAT(dom, HasSubstr("data-done=\"1\"")) << dom.substr(0, 2000);
  EXPECT_THAT(dom, HasSubstr("<tr class=\"backend\" data-id=\"" + mock.id() + "\" data-state=\"healthy\""));
  EXPECT_THAT(dom, HasSubstr("<div id=\"auth\" hidden=\"\">"));
}

// A backend removed and added again starts its request count anew: its row shows no rate for
// that poll (it showed a negative one), and a rate again after it. The page runs with fetch()
// stood in for, answering the gateway's /admin/backends with the counts of each poll.
TEST(StatusPageTest, ABackendAddedAgainShowsNoNegativeRate) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url()});
  const auto backends = http_request(gw.port, "GET", "/admin/backends").body;
  auto page = http_request(gw.port, "GET", "/");
  ASSERT_EQ(page.status, 200);
  if (access("/usr/bin/chromium", X_OK) != 0) GTEST_SKIP() << "chromium (Debian package) is not installed";

  const std::string stand_ins = R"(
  let polls = 0;
  window.fetch = async () => {
    const data = JSON.parse(BACKENDS);
    data.backends[0].requests = [5, 8, 0, 2][Math.min(polls++, 3)];  // added anew at the third
    return new Response(JSON.stringify(data), { status: 200 });
  };
  // Between the polls (one a second from the start): the rate cell of the row.
  const rates = [];
  for (let i = 0; i < 4; ++i) {
    setTimeout(() => {
      const row = document.querySelector("tr.backend");
      rates.push(row ? row.children[5].textContent : "no row");
      html.dataset.rates = rates.join(" ");
    }, 500 + 1000 * i);
  }
)";
  const auto dom = status_page_dom(page.body, stand_ins, backends, 5s);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(dom, m, std::regex("data-rates=\"([^\"]*)\""))) << dom.substr(0, 2000);
  const std::string rates = m[1];
  EXPECT_THAT(rates, StartsWith("– ")) << rates;  // no rate before a second poll
  EXPECT_EQ(rates.find('-'), std::string::npos) << rates;
  EXPECT_THAT(rates, ::testing::MatchesRegex("– [0-9.]+ – [0-9.]+")) << rates;
}

TEST(MetricsTest, SeparateMetricsListenerServesOnlyMetrics) {
  auto mock = start_mock();
  auto gw = start_gateway({"--backend", mock.url(), "--set", "metrics.listen=127.0.0.1:0"});
  const int metrics_port =
      std::stoi(gw.process->wait_for_line(std::regex(R"(infergate metrics on http://127\.0\.0\.1:(\d+)/metrics)")));
  ASSERT_NE(metrics_port, gw.port);
  auto scrape = http_request(metrics_port, "GET", "/metrics");
  EXPECT_EQ(scrape.status, 200);
  EXPECT_THAT(scrape.body, HasSubstr("infergate_build_info"));
  EXPECT_EQ(http_request(metrics_port, "GET", "/health").status, 200);
  auto proxied = http_request(metrics_port, "POST", "/v1/chat/completions", chat_body(false));
  EXPECT_EQ(proxied.status, 404);
  EXPECT_EQ(http_request(metrics_port, "GET", "/admin/backends").status, 404);
  EXPECT_EQ(http_request(metrics_port, "GET", "/nothing").status, 404);
  EXPECT_EQ(http_request(gw.port, "GET", "/metrics").status, 200);  // still on the gateway port too
  // What that listener refuses is no traffic of the gateway's.
  EXPECT_EQ(metric(gw.port, "infergate_requests_total", "code=\"4xx\""), 0);
}

// /v1/models lists what healthy backends serve; with none healthy it is a 503 the OpenAI SDKs
// retry, not an empty list a trainer would index into at start-up.
TEST(HealthTest, ModelsIsA503UntilABackendIsHealthy) {
  auto loading = start_mock({"--startup-delay-ms", "1500"});
  auto gw = start_gateway({"--backend", loading.url(), "--set", "health.interval=200ms", "--set",
                           "health.healthy_threshold=1"});
  auto early = http_request(gw.port, "GET", "/v1/models");
  EXPECT_EQ(early.status, 503) << early.body;
  EXPECT_EQ(early.header("Retry-After"), "1");
  EXPECT_THAT(json::parse(early.body)["error"]["message"].get<std::string>(),
              HasSubstr("no models to list: none of the 1 backends is healthy now (1 starting)"));
  ASSERT_TRUE(poll_until(
      [&] {
        auto r = http_request(gw.port, "GET", "/v1/models");
        return r.status == 200 && json::parse(r.body)["data"].size() == 1;
      },
      10s));

  // Healthy, but its list not read yet (it is read as the backend turns healthy; here it takes
  // 1.5 s): still no empty list.
  auto slow_list = start_mock({"--models-delay-ms", "1500"});
  auto gw2 = start_gateway({"--backend", slow_list.url(), "--set", "health.interval=200ms", "--set",
                            "health.healthy_threshold=1"});
  ASSERT_TRUE(poll_until([&] { return http_request(gw2.port, "GET", "/ready").status == 200; }, 10s));
  auto none = http_request(gw2.port, "GET", "/v1/models");
  EXPECT_EQ(none.status, 503) << none.body;
  EXPECT_EQ(none.header("Retry-After"), "1");
  EXPECT_THAT(none.body, HasSubstr("no models to list yet: none of the 1 healthy backend(s) has listed a model"));
  ASSERT_TRUE(poll_until([&] { return http_request(gw2.port, "GET", "/v1/models").status == 200; }, 10s));

  // A list read and empty (here one nested too deep, taken as none) is answered as it is: a 503
  // would be retried for ever.
  auto unlisted = start_mock({"--models-nesting", "200000"});
  auto gw3 = start_gateway({"--backend", unlisted.url(), "--set", "health.interval=200ms", "--set",
                            "health.healthy_threshold=1"});
  ASSERT_TRUE(poll_until([&] { return json::parse(http_request(unlisted.port, "GET", "/mock/stats").body)["models_requests"] >= 1; }, 10s));
  ASSERT_TRUE(poll_until([&] { return http_request(gw3.port, "GET", "/v1/models").status == 200; }, 5s));
  EXPECT_EQ(json::parse(http_request(gw3.port, "GET", "/v1/models").body)["data"].size(), 0u);
}
