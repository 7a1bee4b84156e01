#include "gateway/router.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>

#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "config/config.hpp"
#include "discovery/json_depth.hpp"
#include "gateway/errors.hpp"
#include "gateway/metrics.hpp"
#include "gateway/status_page.hpp"

namespace infergate::gateway {
namespace {

using nlohmann::json;

LocalResponse json_response(unsigned status, const json& body) {
  return LocalResponse{status, body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json", {}};
}

LocalResponse method_not_allowed(std::string_view allow) {
  auto r = error_response(405, "method not allowed here; use " + std::string(allow));
  r.headers.emplace_back("Allow", std::string(allow));
  return r;
}

std::string iso_time(std::chrono::system_clock::time_point t) {
  if (t == std::chrono::system_clock::time_point{}) return {};
  auto secs = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

json backend_json(const discovery::Backend& b) {
  const auto& info = b.info();
  const auto& st = b.stats;
  auto probe = b.last_probe();
  const auto ok = st.responses_2xx.load() + st.responses_4xx.load();
  return json{
      {"id", info.id},
      {"url", info.url},
      {"node", info.node},
      {"slot", info.slot},
      {"source", info.source},
      {"state", std::string(discovery::to_string(b.state()))},
      {"inflight", st.inflight.load()},
      {"requests", ok + st.responses_5xx.load() + st.errors.load()},
      {"failures", st.responses_5xx.load() + st.errors.load()},
      {"ejections", st.ejections.load()},
      {"last_probe", {{"time", iso_time(probe.time)}, {"ok", probe.ok}, {"result", probe.detail}}},
      {"last_error", b.last_error()},
      {"models", b.models()},
  };
}

bool authorized(const GatewayState& state, std::string_view authorization) {
  const auto& token = state.config.admin_token;
  if (token.empty()) return true;
  // The scheme is case-insensitive (RFC 9110 11.1); the token is not.
  constexpr std::string_view kBearer = "bearer ";
  if (authorization.size() < kBearer.size() ||
      !std::equal(kBearer.begin(), kBearer.end(), authorization.begin(), [](char a, char b) {
        return a == std::tolower(static_cast<unsigned char>(b));
      })) {
    return false;
  }
  auto given = authorization.substr(kBearer.size());
  // One or more spaces may follow the scheme (RFC 9110 11.4: 1*SP).
  while (given.starts_with(' ')) given.remove_prefix(1);
  // Constant-time compare: the token guards weight updates.
  if (given.size() != token.size()) return false;
  unsigned char diff = 0;
  for (std::size_t i = 0; i < token.size(); ++i) diff |= static_cast<unsigned char>(given[i] ^ token[i]);
  return diff == 0;
}

// Admin calls carry URLs and small requests to broadcast; parsing a large body holds the worker
// thread and takes many times its size in memory.
constexpr std::size_t kMaxAdminBody = 16 * 1024 * 1024;

std::optional<json> parse_json_object(std::string_view body, LocalResponse* error) {
  if (body.size() > kMaxAdminBody) {
    *error = error_response(413, "admin request bodies are at most 16 MiB");
    return std::nullopt;
  }
  if (!json_depth_within(body, kMaxJsonDepth)) {
    *error = error_response(400, "request body nests JSON deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    return std::nullopt;
  }
  // Text that is not JSON and JSON of another shape call for different fixes: say which.
  auto j = json::parse(body, nullptr, false);
  if (j.is_discarded()) {
    *error = error_response(400, "request body is not valid JSON");
    return std::nullopt;
  }
  if (!j.is_object()) {
    *error = error_response(400, "request body must be a JSON object");
    return std::nullopt;
  }
  return j;
}

RouteDecision admin_routes(GatewayState& state, const RequestView& req, std::string_view path);

// A JSON value of the wrong type that a handler did not foresee is the client's error, never a
// dropped connection.
RouteDecision admin(GatewayState& state, const RequestView& req, std::string_view path) {
  try {
    return admin_routes(state, req, path);
  } catch (const json::exception& e) {
    return error_response(400, std::string("unexpected JSON in the request: ") + e.what());
  }
}

// GET, and HEAD as GET without the body (which the session leaves out).
bool reads(std::string_view method) { return method == "GET" || method == "HEAD"; }

RouteDecision admin_routes(GatewayState& state, const RequestView& req, std::string_view path) {
  if (!authorized(state, req.authorization)) {
    auto r = error_response(401, "admin API requires 'Authorization: Bearer <admin.token>'");
    r.headers.emplace_back("WWW-Authenticate", "Bearer");
    return r;
  }
  if (state.health == nullptr) return error_response(503, "admin API is not available yet");
  auto& registry = state.registry;
  if (path == "/admin/backends") {
    if (reads(req.method)) return LocalResponse{200, backends_json(state), "application/json", {}};
    if (req.method != "POST") return method_not_allowed("GET, HEAD, POST");
    LocalResponse error;
    auto body = parse_json_object(req.body, &error);
    if (!body) return error;
    if (!body->contains("url") || !(*body)["url"].is_string()) {
      return error_response(400, "expected {\"url\": \"http://host:port\"}");
    }
    discovery::BackendInfo info;
    try {
      info = discovery::backend_from_url((*body)["url"].get<std::string>(), "admin");
    } catch (const std::exception& e) {
      return error_response(400, e.what());
    }
    // Adding a backend that is being removed keeps it: the removal is cancelled.
    auto [backend, added] = state.health->add(std::move(info));
    return json_response(added ? 201 : 200, backend_json(*backend));
  }
  if (path == "/admin/broadcast") {
    if (req.method != "POST") return method_not_allowed("POST");
    LocalResponse error;
    auto body = parse_json_object(req.body, &error);
    if (!body) return error;
    BroadcastRequest b;
    if (body->contains("method") && !(*body)["method"].is_string()) {
      return error_response(400, "method must be a string: GET, POST, PUT or DELETE");
    }
    b.method = body->value("method", "POST");
    if (!body->contains("path") || !(*body)["path"].is_string()) {
      return error_response(400, "expected {\"method\": ..., \"path\": \"/...\", \"body\": ...}");
    }
    b.path = (*body)["path"].get<std::string>();
    if (b.path.empty() || b.path.front() != '/') return error_response(400, "path must start with '/'");
    // It becomes the request line sent to every backend: spaces, line breaks or other bytes
    // outside visible ASCII would let the body smuggle requests of its own.
    if (std::any_of(b.path.begin(), b.path.end(), [](char c) {
          const auto u = static_cast<unsigned char>(c);
          return u <= ' ' || u >= 0x7f;
        })) {
      return error_response(400, "path must be visible ASCII, without spaces (percent-encode the rest)");
    }
    if (b.method != "GET" && b.method != "POST" && b.method != "PUT" && b.method != "DELETE") {
      return error_response(400, "method must be GET, POST, PUT or DELETE");
    }
    if (body->contains("body") && !(*body)["body"].is_null()) {  // null: no body, as when left out
      const auto& payload = (*body)["body"];
      b.body = payload.is_string() ? payload.get<std::string>() : payload.dump();
    }
    return b;
  }
  constexpr std::string_view kPrefix = "/admin/backends/";
  if (path.substr(0, kPrefix.size()) == kPrefix) {
    auto rest = path.substr(kPrefix.size());
    std::string_view action;
    if (auto slash = rest.find('/'); slash != std::string_view::npos) {
      action = rest.substr(slash + 1);
      rest = rest.substr(0, slash);
    }
    // Ids are host:port; a client may percent-encode the colon (127.0.0.1%3A9000).
    std::string id;
    for (std::size_t i = 0; i < rest.size(); ++i) {
      int hex = 0;
      if (rest[i] == '%' && i + 2 < rest.size() &&
          std::from_chars(rest.data() + i + 1, rest.data() + i + 3, hex, 16).ptr == rest.data() + i + 3) {
        id += static_cast<char>(hex);
        i += 2;
      } else {
        id += rest[i];
      }
    }
    // Spelled as an added URL may be (LOCALHOST:1, [0:0:0:0:0:0:0:1]:80): the id it was given.
    std::string ignored;
    if (auto ep = config::parse_backend_url("http://" + id, &ignored)) id = ep->to_string();
    auto backend = registry.find(id);
    if (!backend) return error_response(404, "no backend with id '" + id + "'");
    if (action.empty()) {
      if (reads(req.method)) return json_response(200, backend_json(*backend));
      if (req.method != "DELETE") return method_not_allowed("GET, HEAD, DELETE");
      state.health->remove_when_idle(backend, state.config.timeouts.shutdown);
      auto j = backend_json(*backend);
      // The health thread may have removed an idle backend already: the answer says which.
      const bool removed = j["state"] == "removed";  // the state the answer shows, read once
      j["removal"] = removed ? "removed (it was idle)" : "draining, removed once idle";
      return json_response(202, j);
    }
    if (req.method != "POST") return method_not_allowed("POST");
    if (action == "drain") {
      state.health->drain(backend);
      return json_response(200, backend_json(*backend));
    }
    if (action == "undrain") {
      state.health->undrain(backend);
      return json_response(200, backend_json(*backend));
    }
    return error_response(404, "unknown action '" + std::string(action) + "' (drain, undrain)");
  }
  return error_response(404, "unknown admin endpoint " + std::string(path));
}

// Why the backends that are not serving fail their probes, for /ready: the most frequent last
// probe failure (a name that does not resolve, a refused connection, a 503 while loading), with
// one backend's message as the example, or nothing when none was probed yet. Failures to look
// up a name count together whatever the name (one per node otherwise).
std::string commonest_probe_failure(const discovery::BackendSet& set) {
  std::map<std::string, std::pair<std::size_t, std::string>> counts;  // kind -> count, example
  for (const auto& b : set.all) {
    if (b->state() == discovery::BackendState::kHealthy) continue;
    auto probe = b->last_probe();
    if (probe.time == std::chrono::system_clock::time_point{} || probe.ok) continue;
    std::string kind = probe.detail;
    if (kind.starts_with("resolve ")) kind = "resolve" + kind.substr(std::min(kind.size(), kind.find(": ")));
    auto& entry = counts[kind];
    if (entry.first++ == 0) entry.second = probe.detail;
  }
  if (counts.empty()) return "";
  const auto top = std::max_element(counts.begin(), counts.end(),
                                    [](const auto& a, const auto& b) { return a.second.first < b.second.first; });
  return "; last probe: " + top->second.second + " (" + std::to_string(top->second.first) + " backend(s))";
}

}  // namespace

std::string unhealthy_summary(const discovery::BackendSet& set) {
  std::array<std::size_t, discovery::kBackendStateCount> counts{};
  for (const auto& b : set.all) ++counts[static_cast<std::size_t>(b->state())];
  std::string out;
  for (const auto state : {discovery::BackendState::kDraining, discovery::BackendState::kEjected,
                           discovery::BackendState::kUnhealthy, discovery::BackendState::kStarting}) {
    const auto n = counts[static_cast<std::size_t>(state)];
    if (n == 0) continue;
    out += (out.empty() ? " (" : ", ") + std::to_string(n) + " " + std::string(discovery::to_string(state));
  }
  return out.empty() ? out : out + ")";
}

LocalResponse error_response(unsigned status, std::string_view message) {
  const int code = static_cast<int>(status);
  return LocalResponse{status, error_body(message, error_type_for(code), code), "application/json", {}};
}

std::string backends_json(const GatewayState& state) {
  auto set = state.registry.snapshot();
  json list = json::array();
  for (const auto& b : set->all) list.push_back(backend_json(*b));
  std::uint64_t by_class[3];
  for (std::size_t i = 0; i < 3; ++i) by_class[i] = state.requests_by_class[i].load();
  json out = {
      {"backends", list},
      {"gateway",
       {{"healthy", set->routable.size()},
        {"total", set->all.size()},
        {"inflight", state.inflight_requests.load()},
        {"client_connections", state.client_connections.load()},
        {"client_connections_limit", state.max_client_connections},
        {"requests",
         {{"2xx", by_class[0]},
          {"4xx", by_class[1]},
          {"5xx", by_class[2]},
          {"client_closed", state.requests_client_closed.load()}}},
        {"uptime_seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - state.started).count()}}},
  };
  return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

LocalResponse broadcast_response(const std::vector<BroadcastResult>& results) {
  json list = json::array();
  bool all_ok = !results.empty();
  for (const auto& r : results) {
    json item = {{"backend", r.backend}, {"status", r.status}};
    if (!r.skipped.empty()) {
      // Not healthy, so not sent: it missed what the others got (a weight update, say).
      item["skipped"] = r.skipped;
      all_ok = false;
      list.push_back(std::move(item));
      continue;
    }
    auto body = json_depth_within(r.body, kMaxJsonDepth) ? json::parse(r.body, nullptr, false) : json(json::value_t::discarded);
    item["body"] = body.is_discarded() ? json(r.body) : body;
    if (!r.error.empty()) item["error"] = r.error;
    all_ok = all_ok && r.status >= 200 && r.status < 300;
    list.push_back(std::move(item));
  }
  return json_response(all_ok ? 200 : 207, json{{"results", list}, {"ok", all_ok}});
}

RouteDecision route(GatewayState& state, const RequestView& req) {
  auto path = req.target.substr(0, req.target.find('?'));
  const bool get = req.method == "GET" || req.method == "HEAD";
  if (path == "/health") {
    if (!get) return method_not_allowed("GET, HEAD");
    return LocalResponse{200, R"({"status":"ok"})", "application/json", {}};
  }
  if (path == "/ready") {
    if (!get) return method_not_allowed("GET, HEAD");
    auto set = state.registry.snapshot();
    const auto healthy = set->routable.size();
    const auto needed = static_cast<std::size_t>(state.config.health.min_healthy_backends);
    if (healthy >= needed && !state.stopping.load()) {
      return json_response(200, {{"status", "ready"}, {"healthy", healthy}, {"total", set->all.size()}});
    }
    std::string reason = state.stopping.load() ? "shutting down"
                         : set->all.empty()   ? "no backends: " + state.discovery_how
                                              : std::to_string(healthy) + " healthy backend(s) of " +
                                                  std::to_string(set->all.size()) + ", need " +
                                                  std::to_string(needed) + unhealthy_summary(*set) +
                                                  commonest_probe_failure(*set);
    auto r = json_response(503, {{"status", "not ready"}, {"reason", reason}, {"healthy", healthy},
                                 {"total", set->all.size()}});
    r.headers.emplace_back("Retry-After", "1");
    return r;
  }
  if (path == "/metrics") {
    if (!get) return method_not_allowed("GET, HEAD");
    return LocalResponse{200, render_metrics(state), "text/plain; version=0.0.4; charset=utf-8", {}};
  }
  if (path == "/v1/models") {
    if (!get) return method_not_allowed("GET, HEAD");
    auto set = state.registry.snapshot();
    if (set->routable.empty()) {
      // Not an empty list: a trainer that reads the first model's id at start-up would fail on
      // it, where a 503 is retried by OpenAI's SDKs.
      auto r = error_response(503, set->all.empty()
                                       ? "no inference backends, so no models to list: " + state.discovery_how
                                       : "no models to list: none of the " + std::to_string(set->all.size()) +
                                             " backends is healthy now" + unhealthy_summary(*set) + "; retry shortly");
      r.headers.emplace_back("Retry-After", "1");
      return r;
    }
    std::set<std::string> seen;
    json data = json::array();
    // Each model as the first healthy backend serving it describes it (vLLM's carries
    // max_model_len, root, ...: trainers read them).
    for (const auto* b : set->routable) {
      for (const auto& m : b->model_objects()) {
        if (seen.insert(m.id).second) data.push_back(json::parse(m.object));
      }
    }
    const bool unread = std::any_of(set->routable.begin(), set->routable.end(),
                                    [](const auto* b) { return !b->models_asked.load(); });
    if (data.empty() && unread) {
      // Healthy, but its list not read yet (it is read once a backend turns healthy). A list read
      // and empty (or a /v1/models that fails) is answered as it is: a 503 would be retried for
      // ever.
      auto r = error_response(503, "no models to list yet: none of the " + std::to_string(set->routable.size()) +
                                       " healthy backend(s) has listed a model (each one's /v1/models is read when "
                                       "it becomes healthy, then every 30 s); retry shortly");
      r.headers.emplace_back("Retry-After", "1");
      return r;
    }
    return json_response(200, {{"object", "list"}, {"data", data}});
  }
  if (path == "/" || path == "/status") {
    if (!get) return method_not_allowed("GET, HEAD");
    return LocalResponse{200, std::string(kStatusPage), "text/html; charset=utf-8", {}};
  }
  if (path == "/admin" || path.substr(0, 7) == "/admin/") return admin(state, req, path);
  return ProxyRequest{};
}

}  // namespace infergate::gateway
