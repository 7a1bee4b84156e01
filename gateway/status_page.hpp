// The status page served at / and /status: one self-contained HTML file (no external assets)
// that polls /admin/backends and shows each backend's state, load and errors.
#pragma once

#include <string_view>

namespace infergate::gateway {

inline constexpr std::string_view kStatusPage = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>infergate</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .3em; }
  #summary { margin-bottom: 1em; color: #555; }
  table { border-collapse: collapse; min-width: 60em; }
  th, td { padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; }
  th { background: #f4f4f4; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .state { display: inline-block; padding: 0 .5em; border-radius: .6em; color: #fff; }
  .healthy { background: #2e7d32; } .starting { background: #757575; }
  .unhealthy { background: #c62828; } .ejected { background: #ef6c00; }
  .draining { background: #1565c0; } .removed { background: #424242; }
  #error { color: #c62828; }
  #auth { margin-bottom: 1em; }
</style>
</head>
<body>
<h1>infergate</h1>
<div id="summary">loading…</div>
<div id="error"></div>
<div id="auth" hidden>The admin API needs its token (admin.token) to show the backends.
<button id="enter-token" type="button">Enter token</button></div>
<table>
  <thead><tr><th>backend</th><th>node</th><th>slot</th><th>state</th><th>in flight</th>
  <th>req/s</th><th>requests</th><th>failures</th><th>last probe</th><th>last error</th></tr></thead>
  <tbody id="backends"></tbody>
</table>
<script>
"use strict";
let previous = new Map();  // the last poll's request count per backend
let lastPoll = 0;
// Set when the token prompt is cancelled: the page then waits for the button instead of
// prompting again on every refresh, which would leave the operator no way out of the dialog.
let waitingForToken = false;
function headers() {
  const token = localStorage.getItem("infergateAdminToken");
  return token ? { Authorization: "Bearer " + token } : {};
}
function askForToken() {
  const token = prompt("Admin token");
  waitingForToken = !token;
  document.getElementById("auth").hidden = !waitingForToken;
  if (token) {
    localStorage.setItem("infergateAdminToken", token);
    refresh();
  }
}
document.getElementById("enter-token").addEventListener("click", askForToken);
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
async function refresh() {
  if (waitingForToken) return;
  try {
    const sentWith = localStorage.getItem("infergateAdminToken");
    const response = await fetch("/admin/backends", { headers: headers(), cache: "no-store" });
    if (response.status === 401) {
      // Refreshes overlap (one a second, whatever the last did): one sent before the prompt was
      // cancelled, or before a token was entered, must not ask again.
      if (!waitingForToken && sentWith === localStorage.getItem("infergateAdminToken")) askForToken();
      return;
    }
    const data = await response.json();
    const now = performance.now();
    const seconds = lastPoll ? (now - lastPoll) / 1000 : 0;
    lastPoll = now;
    const gw = data.gateway;
    document.getElementById("summary").textContent =
      `${gw.healthy} of ${gw.total} backends healthy · ${gw.inflight} in flight · ` +
      `${gw.client_connections} client connections · requests 2xx ${gw.requests["2xx"]}, ` +
      `4xx ${gw.requests["4xx"]}, 5xx ${gw.requests["5xx"]}, client closed ${gw.requests["client_closed"]}`;
    const body = document.getElementById("backends");
    body.replaceChildren();
    const seen = new Map();  // this poll's counts; a removed backend's are dropped
    for (const b of data.backends) {
      const row = document.createElement("tr");
      row.className = "backend";
      row.dataset.id = b.id;
      row.dataset.state = b.state;
      cell(row, b.id);
      cell(row, b.node);
      cell(row, b.slot, "num");
      const state = document.createElement("span");
      state.className = "state " + b.state;
      state.textContent = b.state;
      row.appendChild(document.createElement("td")).appendChild(state);
      cell(row, b.inflight, "num");
      // A backend removed and added again starts its count anew: no rate until the next poll.
      const before = previous.get(b.id);
      const rate = before !== undefined && before <= b.requests && seconds > 0
                       ? ((b.requests - before) / seconds).toFixed(1) : "–";
      seen.set(b.id, b.requests);
      cell(row, rate, "num");
      cell(row, b.requests, "num");
      cell(row, b.failures, "num");
      cell(row, b.last_probe.time ? `${b.last_probe.result} at ${b.last_probe.time}` : "–");
      cell(row, b.last_error || "");
      body.appendChild(row);
    }
    previous = seen;
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot reach the gateway: " + e;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
)HTML";

}  // namespace infergate::gateway
