// Status page: live updates over server-sent events and the admin action buttons.
// The server renders the page body; each "status" event carries the re-rendered body.
(function () {
  "use strict";
  const main = document.getElementById("status");
  const live = document.getElementById("live");
  const result = document.getElementById("action-result");
  // The words the page shows, in its language (status.html renders them from the catalog).
  const strings = JSON.parse(document.body.dataset.strings || "{}");
  function tr(key, english) { return strings[key] || english; }

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
      setLive(true, tr("live", "live"));
    });
    events.onerror = function () {
      setLive(false, tr("reconnecting", "reconnecting…"));
      // An expired login makes the stream fail for good: find out and go to the login page.
      fetch("/api/status", { credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) { events.close(); location.href = "/login?next=/"; }
      }).catch(function () { /* the gateway is down; EventSource keeps retrying */ });
    };
  }

  // Sensitive actions (reload, reset, rotate) want the credential confirmed within the last
  // 5 minutes: the server says "re-authentication required", the page asks for it once, then retries.
  const reauth = document.getElementById("reauth-form");
  let pending = null;

  function post(url, body) {
    result.textContent = "…";
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.json().then(function (data) {
        if (r.status === 401 && data.error === "re-authentication required") {
          pending = function () { return post(url, body); };
          reauth.hidden = false;
          reauth.elements.secret.focus();
        }
        result.textContent = (r.ok ? "" : "HTTP " + r.status + ": ") + JSON.stringify(data, null, 2);
      });
    }).catch(function (e) { result.textContent = tr("failed", "request failed:") + " " + e; });
  }

  reauth.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const body = {};
    body[reauth.dataset.field] = reauth.elements.secret.value;
    fetch("/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { result.textContent = "HTTP " + r.status + ": " + JSON.stringify(data, null, 2); return; }
        reauth.hidden = true;
        reauth.elements.secret.value = "";
        const retry = pending;
        pending = null;
        if (retry) { retry(); }
      });
    }).catch(function (e) { result.textContent = tr("failed", "request failed:") + " " + e; });
  });

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
