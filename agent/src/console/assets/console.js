// AutoCore Edge operator console: live updates (SSE), actions without reloading, hold-to-run.
// Served by the agent itself; no framework, no network beyond the agent.
"use strict";
(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
  const csrf = meta("csrf-token");
  const notice = document.getElementById("notice");
  const say = (text, bad) => {
    if (!notice) return;
    notice.textContent = text;
    notice.classList.toggle("bad", !!bad);
  };

  const post = async (url, data) => {
    const response = await fetch(url, {
      method: "POST",
      headers: { "X-CSRF-Token": csrf, Accept: "application/json" },
      body: new URLSearchParams(data),
      credentials: "same-origin",
    });
    let body = {};
    try { body = await response.json(); } catch (_) { body = { message: response.statusText }; }
    return { ok: response.ok, status: response.status, body };
  };

  const showLatch = (latched, text) => {
    const latch = document.getElementById("latch");
    if (!latch) return;
    latch.hidden = !latched;
    if (text !== undefined) document.getElementById("latch-text").textContent = text;
    const overview = document.getElementById("overview-latch");
    if (overview) overview.textContent = latched ? "LATCHED" : "not latched";
  };

  // Forms marked data-js are posted in the background; the answer shows in the notice line.
  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-js")) return;
    event.preventDefault();
    const data = new FormData(form, event.submitter);
    try {
      // getAttribute: a control named "action" shadows form.action.
      const { ok, body } = await post(form.getAttribute("action"), data);
      say(body.message || (ok ? "done" : "refused"), !ok);
      if (typeof body.latched === "boolean") {
        showLatch(body.latched, body.latch_text);
      }
    } catch (_) {
      say("the agent did not answer", true);
    }
  });

  // Hold-to-run: "hold", then a keep-alive every 250 ms while held; release on let go. If this
  // page stops sending (closed, network lost), the agent's 1 s lease lapses and the relay goes off.
  let held = null;
  const holdData = (button) => ({
    master: button.dataset.master,
    slave: button.dataset.slave,
    relay: button.dataset.relayNumber,
  });
  const startHold = async (button) => {
    if (held) return;
    const data = holdData(button);
    held = { button, data, timer: null };
    button.classList.add("pressed");
    button.setAttribute("aria-pressed", "true");
    const { ok, body } = await post("/console/hold", data).catch(() => ({ ok: false, body: { message: "the agent did not answer" } }));
    say(body.message, !ok);
    if (!ok || !held || held.button !== button) { if (held && held.button === button) endHold(false); return; }
    held.timer = setInterval(async () => {
      const r = await post("/console/hold/keepalive", data).catch(() => null);
      if (r && !r.ok) { say(r.body.message, true); endHold(false); }
    }, 250);
  };
  const endHold = async (release) => {
    if (!held) return;
    const { button, data, timer } = held;
    held = null;
    if (timer) clearInterval(timer);
    button.classList.remove("pressed");
    button.setAttribute("aria-pressed", "false");
    if (release) {
      const r = await post("/console/hold/release", data).catch(() => null);
      if (r) say(r.body.message, !r.ok);
    }
  };
  document.querySelectorAll("button.hold").forEach((button) => {
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("pointerdown", (e) => { e.preventDefault(); button.setPointerCapture?.(e.pointerId); startHold(button); });
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      button.addEventListener(type, () => endHold(true));
    }
    button.addEventListener("keydown", (e) => {
      if ((e.key === " " || e.key === "Enter") && !e.repeat) { e.preventDefault(); startHold(button); }
    });
    button.addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") endHold(true); });
    button.addEventListener("blur", () => endHold(true));
    button.addEventListener("contextmenu", (e) => e.preventDefault());
  });

  // Live: the agent sends its state whenever it changes; the page says when the link is lost.
  const live = meta("live");
  const conn = document.getElementById("conn");
  if (live && window.EventSource) {
    const source = new EventSource(live);
    source.addEventListener("open", () => { if (conn) conn.hidden = true; document.body.dataset.live = "open"; });
    source.addEventListener("error", () => { if (conn) conn.hidden = false; document.body.dataset.live = "lost"; });
    source.addEventListener("state", (event) => {
      if (conn) conn.hidden = true;
      document.body.dataset.live = "open";
      const view = JSON.parse(event.data);
      showLatch(view.latched, view.latch_text);
      // A macro the view does not list is not running.
      document.querySelectorAll('[data-live^="macro:"]').forEach((el) => {
        if (!(el.dataset.live in view.texts)) el.textContent = "idle";
      });
      for (const [key, text] of Object.entries(view.texts)) {
        document.querySelectorAll(`[data-live="${CSS.escape(key)}"]`).forEach((el) => { el.textContent = text; });
      }
      document.querySelectorAll("[data-live='backend']").forEach((el) => {
        el.classList.toggle("bad", !view.texts.backend.startsWith("reachable"));
      });
      for (const [key, on] of Object.entries(view.relays)) {
        document.querySelectorAll(`[data-relay="${CSS.escape(key)}"]`).forEach((el) => {
          el.dataset.on = String(on);
          el.textContent = on ? "on" : "off";
        });
      }
    });
  }
})();
