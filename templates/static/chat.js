// Web chat client: one websocket per tab, streamed answers appended as `delta` frames arrive.
(function () {
  "use strict";
  const log = document.getElementById("log");
  const form = document.getElementById("form");
  const input = document.getElementById("text");
  const conn = document.getElementById("conn");
  // The words the page shows, in its language (chat.html renders them from the catalog).
  const strings = JSON.parse(document.body.dataset.strings || "{}");
  function tr(key, english) { return strings[key] || english; }
  function state(name, text) { conn.dataset.state = name; conn.textContent = text; }
  let session = localStorage.getItem("botgate.session") || "";
  let ws = null;
  let current = null; // the bubble receiving deltas
  let backoff = 500;

  function bubble(cls, text) {
    const div = document.createElement("div");
    div.className = "msg " + cls;
    div.textContent = text;
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(proto + "//" + location.host + "/chat/ws?session=" + encodeURIComponent(session));
    ws.onopen = function () { state("connected", tr("connected", "connected")); backoff = 500; };
    ws.onclose = function () {
      state("retrying", tr("retrying", "disconnected, retrying…"));
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 10000);
      // A refused handshake looks like any close; an expired admin login means: log in again.
      fetch("/api/status", { credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) { location.href = "/login?next=/chat"; }
      }).catch(function () { /* the gateway is down: keep retrying */ });
    };
    ws.onmessage = function (ev) {
      const f = JSON.parse(ev.data);
      if (f.type === "hello") { session = f.session; localStorage.setItem("botgate.session", session); }
      else if (f.type === "delta") { if (!current) current = bubble("bot", ""); current.textContent += f.text; }
      else if (f.type === "done") { if (!current) current = bubble("bot", ""); current.textContent = f.text; current = null; }
      else if (f.type === "notice") { bubble("notice", f.text); current = null; }
      else if (f.type === "error") { bubble("err", f.error); }
      log.scrollTop = log.scrollHeight;
    };
  }

  function send(text) {
    if (!ws || ws.readyState !== WebSocket.OPEN) { bubble("err", tr("not_connected", "not connected yet")); return; }
    bubble("user", text);
    ws.send(JSON.stringify({ type: "message", id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()), text: text }));
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    const text = input.value.trim();
    if (text) { send(text); input.value = ""; }
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("reset").addEventListener("click", function () { send("/reset"); });
  connect();
})();
