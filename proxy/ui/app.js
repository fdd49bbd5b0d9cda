// kernel-events-proxy dashboard: sign in, then one EventSource on the event stream.
//
// The session cookie (HttpOnly, set by POST /server/login) authenticates the stream;
// the browser resends it, and Last-Event-ID, on every reconnect by itself. Everything
// from the server is written with textContent, never parsed as HTML.
//
// The stream is opened with initialState=true: it starts with where every visible
// session stands (stream_state_begin, one event per session, stream_state_end), then
// carries changes. A later state (a resync: the stream could not resume) replaces the
// table; it is collected first and swapped in at its end, so a state cut short leaves
// the table as it was. withGroup=true puts each session's group in the data.
"use strict";

(() => {
  const EVENTS_PATH = "/stream/kernel/_/events";
  // EventSource dispatches a named event only to listeners for that name: these are
  // the names seen over the original's history (kernel_* and the later session_*).
  // Unnamed events arrive as "message" and are handled the same way.
  const STAGES = [
    "enqueued", "scheduled", "checking_precondition", "preparing", "pulling", "creating",
    "started", "restarting", "terminating", "terminated", "cancelled", "success", "failure",
  ];
  const LIFECYCLE = ["message", ...STAGES.map((s) => `kernel_${s}`), ...STAGES.map((s) => `session_${s}`)];
  const KIND = {
    enqueued: "pending", scheduled: "pending", checking_precondition: "pending",
    preparing: "pending", pulling: "pending", creating: "pending", restarting: "pending",
    started: "running", terminating: "stopping", terminated: "done", success: "done",
    cancelled: "failed", failure: "failed",
  };
  const STATE_TEXT = {
    connecting: "Opening the event stream…",
    loading: "Loading where every session stands…",
    live: "Receiving events as they happen.",
    reconnecting: "Connection lost. Reconnecting…",
    resumed: "Reconnected and resumed where the stream left off.",
    gap: "Live, but some events may be missing.",
    closed: "Not connected.",
  };

  // The oldest-updated rows go first past this many (a cluster runs thousands).
  const MAX_ROWS = 500;

  const $ = (id) => document.getElementById(id);
  const view = {
    login: $("login-view"), dash: $("dash-view"), who: $("who"),
    rows: $("rows"), empty: $("empty"), meta: $("meta"),
    status: $("status"), statusLabel: $("status-label"), statusText: $("status-text"),
  };

  let me = null; // {access_key, role, domain, user_id}
  let source = null;
  let opened = false; // has the current EventSource been open before?
  let lastId = ""; // the last dispatched event's id (position blocks move the browser's silently)
  let filters = { sessionId: "", ownerAccessKey: "", group: "" };
  let received = 0;
  let retryTimer = null;
  let withState = true; // false once the server said it has no state to give
  let staging = null; // a state being received: {resync, rows: [[name, data], ...]}
  const sessions = new Map(); // owner + "\n" + session name -> {row, cells}

  // --- connection state --------------------------------------------------------------

  function setState(state, text) {
    view.status.dataset.state = state;
    view.statusLabel.textContent = state;
    view.statusText.textContent = text || STATE_TEXT[state];
  }

  function streamUrl(extra) {
    const params = new URLSearchParams({ withGroup: "true" });
    if (withState) params.set("initialState", "true");
    for (const [name, value] of Object.entries(filters)) {
      if (value) params.set(name, value);
    }
    for (const [name, value] of Object.entries(extra || {})) params.set(name, value);
    const query = params.toString();
    return query ? `${EVENTS_PATH}?${query}` : EVENTS_PATH;
  }

  function connect(resumeFrom) {
    disconnect();
    hideError();
    const url = streamUrl(resumeFrom ? { lastEventId: resumeFrom } : null);
    const es = new EventSource(url, { withCredentials: true });
    source = es;
    opened = false;
    staging = null;
    setState(resumeFrom ? "reconnecting" : "connecting");
    es.onopen = () => {
      if (source !== es) return;
      // A second open of the same EventSource is the browser's own reconnect: it
      // sent Last-Event-ID, and the server resumes after it (or sends a new state).
      // A state that the drop cut short is dropped: the table is still whole.
      staging = null;
      setState(opened || resumeFrom ? "resumed" : withState ? "loading" : "live");
      opened = true;
    };
    es.onerror = () => {
      if (source !== es) return;
      if (es.readyState === EventSource.CONNECTING) {
        setState("reconnecting");
      } else {
        // CLOSED: the server answered with an error (or not with a stream); ask why.
        diagnose(url);
      }
    };
    for (const name of LIFECYCLE) es.addEventListener(name, onLifecycle);
    es.addEventListener("stream_state_begin", onStateBegin);
    es.addEventListener("stream_state_end", onStateEnd);
    es.addEventListener("stream_gap", onGap);
    es.addEventListener("stream_overflow", () => {
      if (source === es) setState("reconnecting", "This page fell behind; catching up…");
    });
    es.addEventListener("server_close", () => {
      // The proxy is shutting down (a restart or a deploy). The browser reconnects by
      // itself, with Last-Event-ID; the state says so in the meantime.
      if (source === es) setState("closed", "The server closed the stream; reconnecting…");
    });
  }

  function disconnect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (source) {
      source.close();
      source = null;
    }
  }

  async function diagnose(url) {
    disconnect();
    setState("closed", "The stream was refused.");
    const abort = new AbortController();
    let response;
    try {
      response = await fetch(url, { credentials: "include", signal: abort.signal });
    } catch {
      return retryLater();
    }
    if (response.ok) {
      abort.abort(); // it works now: a transient failure (a proxy in front restarting)
      return retryLater();
    }
    const body = await response.json().catch(() => null);
    const detail = (body && body.detail) || `HTTP ${response.status}`;
    if (response.status === 401) {
      signedOut(`Your session has ended (${detail}). Sign in again.`);
    } else if (body && body.error === "state-unavailable" && withState) {
      // An upstream without snapshots: changes only, as before there were states.
      withState = false;
      connect(lastId);
    } else if (response.status >= 500) {
      retryLater();
    } else {
      setState("closed", "The stream was refused.");
      showError(`The server refused this stream: ${detail}`);
    }
  }

  function retryLater() {
    setState("reconnecting");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(() => connect(lastId), 3000);
  }

  // --- events --------------------------------------------------------------------------

  function onLifecycle(event) {
    if (event.target !== source) return;
    if (event.lastEventId) lastId = event.lastEventId;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!data || typeof data.sessionId !== "string") return;
    if (staging) {
      staging.rows.push([event.type, data]); // where a session stands, not a change
      return;
    }
    received += 1;
    upsert(event.type, data, false);
  }

  function onStateBegin(event) {
    if (event.target !== source) return;
    let data = {};
    try {
      data = JSON.parse(event.data) || {};
    } catch {
      // still a state
    }
    // A begin before the last state's end supersedes that one.
    staging = { resync: data.reason === "resync", rows: [] };
    if (staging.resync) setState("loading", "The stream could not resume: reloading…");
  }

  function onStateEnd(event) {
    if (event.target !== source || !staging) return;
    if (event.lastEventId) lastId = event.lastEventId;
    const { resync, rows } = staging;
    staging = null;
    replaceTable(rows);
    setState("live", resync ? "Reloaded: the table shows where every session stands now." : "");
  }

  // The table, replaced by a state's sessions (given in log order: the newest last).
  function replaceTable(rows) {
    sessions.clear();
    view.rows.replaceChildren();
    for (const [name, data] of rows) upsert(name, data, true);
    view.empty.hidden = sessions.size > 0;
    $("gap-banner").hidden = true;
    renderMeta();
  }

  function onGap(event) {
    if (event.target !== source) return;
    if (event.lastEventId) lastId = event.lastEventId;
    let data = {};
    try {
      data = JSON.parse(event.data) || {};
    } catch {
      // still a gap
    }
    const reason = data.reason ? ` (${data.reason})` : "";
    $("gap-text").textContent =
      `The server could not deliver every event after ${data.after || "the start"}${reason}.`;
    $("gap-banner").hidden = false;
    setState("gap");
  }

  function stage(name) {
    const match = /^(?:kernel|session)_(.+)$/.exec(name);
    return match ? match[1] : name;
  }

  function cell(row, className) {
    const td = document.createElement("td");
    td.className = className;
    row.append(td);
    return td;
  }

  function upsert(name, data, fromState) {
    const owner = typeof data.ownerAccessKey === "string" ? data.ownerAccessKey : "";
    const key = `${owner}\n${data.sessionId}`;
    let entry = sessions.get(key);
    if (!entry) {
      const row = document.createElement("tr");
      row.dataset.session = data.sessionId;
      row.dataset.owner = owner;
      entry = {
        row,
        session: cell(row, "session"),
        owner: cell(row, "owner"),
        group: cell(row, "group"),
        state: cell(row, "state"),
        reason: cell(row, "reason"),
        result: cell(row, "result"),
        updated: cell(row, "updated"),
      };
      entry.session.textContent = data.sessionId;
      entry.owner.textContent = owner || "—";
      row.dataset.key = key;
      sessions.set(key, entry);
    }
    const { row } = entry;
    if (data.kernelId) entry.session.title = `kernel ${data.kernelId}`;
    // The data has the group because the stream asked (withGroup=true).
    text(entry.group, typeof data.group === "string" ? data.group : filters.group);

    const kind = KIND[stage(name)] || (data.result === "FAILURE" ? "failed" : "other");
    const failed = data.result === "FAILURE";
    const badge = document.createElement("span");
    badge.className = `badge ${failed && kind === "done" ? "failed" : kind}`;
    badge.textContent = stage(name).replace(/_/g, " ");
    entry.state.replaceChildren(badge);
    entry.state.dataset.event = name;
    row.dataset.event = name;

    text(entry.reason, typeof data.reason === "string" ? data.reason : "");
    const parts = [];
    if (data.result && data.result !== "UNDEFINED") parts.push(data.result);
    if (typeof data.exitCode === "number") parts.push(`exit ${data.exitCode}`);
    text(entry.result, parts.join(" · "));
    entry.result.classList.toggle("result-success", data.result === "SUCCESS");
    entry.result.classList.toggle("result-failure", data.result === "FAILURE");

    if (fromState) {
      // Where it stood when the stream opened: when it got there is not known.
      entry.updated.textContent = "earlier";
      entry.updated.title = "The state when the stream opened: the time of the change is not known.";
      entry.updated.classList.add("none");
    } else {
      const now = new Date();
      const time = document.createElement("time");
      time.dateTime = now.toISOString();
      time.textContent = now.toLocaleTimeString([], { hour12: false });
      entry.updated.replaceChildren(time);
      entry.updated.title = "";
      entry.updated.classList.remove("none");
    }

    // Most recently changed first; a change flashes briefly (a state's rows do not).
    view.rows.prepend(row);
    while (sessions.size > MAX_ROWS) {
      const oldest = view.rows.lastElementChild;
      sessions.delete(oldest.dataset.key);
      oldest.remove();
    }
    if (!fromState) {
      row.classList.remove("changed");
      void row.offsetWidth; // restart the animation
      row.classList.add("changed");
      view.empty.hidden = true;
      renderMeta();
    }
  }

  function text(td, value) {
    td.textContent = value || "—";
    td.classList.toggle("none", !value);
  }

  function renderMeta() {
    const n = sessions.size;
    view.meta.textContent =
      `${n} session${n === 1 ? "" : "s"} · ${received} event${received === 1 ? "" : "s"} received`;
  }

  function clearTable() {
    sessions.clear();
    view.rows.replaceChildren();
    view.empty.hidden = false;
    received = 0;
    lastId = "";
    renderMeta();
    $("gap-banner").hidden = true;
  }

  // --- filters -------------------------------------------------------------------------

  function readFilters() {
    return {
      sessionId: $("f-session").value.trim(),
      ownerAccessKey: $("f-owner").value.trim(),
      group: $("f-group").value.trim(),
    };
  }

  function renderHint() {
    const hint = $("filter-hint");
    if (!me) return;
    let text;
    if (me.role === "user") {
      text = "You see the sessions of your own user, in your domain.";
    } else if (filters.sessionId && !filters.ownerAccessKey) {
      text =
        `A session name alone matches sessions owned by ${me.access_key}; ` +
        "add an owner access key to watch someone else's.";
    } else {
      text = me.role === "admin"
        ? `You see every session in the domain ${me.domain}.`
        : "You see every session.";
    }
    const active = [
      ["session", filters.sessionId], ["owner", filters.ownerAccessKey], ["group", filters.group],
    ].filter(([, value]) => value).map(([name, value]) => `${name} ${value}`);
    if (active.length) text += ` Showing only ${active.join(", ")}.`;
    hint.textContent = text;
  }

  function applyFilters(event) {
    event.preventDefault();
    filters = readFilters();
    renderHint();
    clearTable();
    connect(); // new parameters: a new stream, its state first
  }

  // --- sign in and out -------------------------------------------------------------------

  function showError(message) {
    $("error-text").textContent = message;
    $("error-banner").hidden = false;
  }

  function hideError() {
    $("error-banner").hidden = true;
  }

  function signedIn(principal) {
    me = principal;
    $("who-key").textContent = principal.access_key;
    $("who-role").textContent = principal.role;
    $("who-domain").textContent = principal.domain;
    view.who.hidden = false;
    view.login.hidden = true;
    view.dash.hidden = false;
    const owner = $("f-owner");
    owner.disabled = principal.role === "user";
    owner.placeholder = principal.role === "user" ? principal.access_key : "any";
    renderHint();
    clearTable();
    withState = true;
    connect();
  }

  function signedOut(message) {
    disconnect();
    me = null;
    setState("closed", "Signed out.");
    view.who.hidden = true;
    view.dash.hidden = true;
    view.login.hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("secret-key").value = "";
    $("access-key").focus();
  }

  function signInOff() {
    disconnect();
    view.who.hidden = true;
    view.dash.hidden = true;
    view.login.hidden = true;
    $("off-view").hidden = false;
  }

  async function login(event) {
    event.preventDefault();
    const submit = $("login-submit");
    const error = $("login-error");
    error.hidden = true;
    submit.disabled = true;
    try {
      const response = await fetch("/server/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({
          access_key: $("access-key").value.trim(),
          secret_key: $("secret-key").value,
        }),
      });
      const body = await response.json().catch(() => null);
      if (response.status === 404 && body && body.error === "sessions-disabled") {
        return signInOff();
      }
      if (!response.ok) {
        error.textContent = response.status === 401
          ? "The access key or secret key is wrong."
          : (body && body.detail) || `Sign-in failed (HTTP ${response.status}).`;
        error.hidden = false;
        return;
      }
      $("secret-key").value = "";
      signedIn(body);
    } catch {
      error.textContent = "The server cannot be reached.";
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  }

  async function logout() {
    disconnect(); // the stream ends first: nothing more arrives after "Log out"
    clearTable();
    try {
      await fetch("/server/logout", { method: "POST", credentials: "same-origin" });
    } finally {
      signedOut();
    }
  }

  async function start() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("filters").addEventListener("submit", applyFilters);
    $("f-clear").addEventListener("click", (event) => {
      for (const id of ["f-session", "f-owner", "f-group"]) $(id).value = "";
      applyFilters(event);
    });
    $("gap-dismiss").addEventListener("click", () => {
      $("gap-banner").hidden = true;
      if (view.status.dataset.state === "gap") setState("live");
    });
    renderMeta();
    try {
      const response = await fetch("/server/session", { credentials: "same-origin" });
      if (response.ok) return signedIn(await response.json());
      if (response.status === 404) return signInOff();
    } catch {
      // not signed in, or the server is away: the form it is
    }
    signedOut();
  }

  start();
})();
