// Status page: live updates over server-sent events and the admin action buttons.
// The server renders the page body; each "status" event carries the re-rendered body.
(function () {
  "use strict";
  const main = document.getElementById("status");
  const live = document.getElementById("live");
  const result = document.getElementById("action-result");

  function setLive(on, text) {
    live.textContent = text;
    live.className = "live " + (on ? "on" : "off");
  }

  function connect() {
    const events = new EventSource("/status/events");
    events.addEventListener("status", function (ev) {
      const data = JSON.parse(ev.data);
      main.innerHTML = data.html;
      main.dataset.updated = String(data.at);
      setLive(true, "live");
    });
    events.onerror = function () {
      setLive(false, "reconnecting…");
      // An expired login makes the stream fail for good: find out and go to the login page.
      fetch("/api/status", { credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) { events.close(); location.href = "/login?next=/"; }
      }).catch(function () { /* the gateway is down; EventSource keeps retrying */ });
    };
  }

  function post(url, body) {
    result.textContent = "…";
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.json().then(function (data) {
        result.textContent = (r.ok ? "" : "HTTP " + r.status + ": ") + JSON.stringify(data, null, 2);
      });
    }).catch(function (e) { result.textContent = "request failed: " + e; });
  }

  // Delegated, because the buttons inside <main> are replaced on every update.
  document.addEventListener("click", function (ev) {
    const button = ev.target.closest("button[data-action]");
    if (button) { post(button.dataset.action); }
  });
  document.getElementById("reset-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    const input = ev.target.elements.conversation;
    post("/api/conversations/reset", { conversation: input.value.trim() });
  });
  connect();
})();
