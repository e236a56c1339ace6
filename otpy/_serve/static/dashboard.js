// otpy's dashboard: plain JavaScript, no library, vendored with the package.
//
// The node pushes a snapshot of its views over server-sent events (/events) each time
// it rebuilds them; this page renders the newest one. Every value from the node is put
// in the page as text (textContent), never as HTML. Actions are confirmed in the page,
// then POSTed as JSON to /api/action with the session's CSRF token.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  let snapshot = null;
  let sortKey = "mailbox";
  let selected = null;
  let detailBusy = false;

  // -- building the page, safely --------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const fmt = {
    int: (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US")),
    rate: (n) => (n === null || n === undefined ? "–" : n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(1)),
    seconds(s) {
      if (s === null || s === undefined) return "–";
      if (s < 1e-3) return (s * 1e6).toFixed(s < 1e-5 ? 1 : 0) + " µs";
      if (s < 1) return (s * 1e3).toFixed(s < 1e-2 ? 2 : 1) + " ms";
      return s.toFixed(2) + " s";
    },
    ms: (ms) => (ms === null || ms === undefined ? "–" : ms < 10 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms"),
    pct: (x) => (x === null || x === undefined ? "–" : (x * 100).toFixed(x < 0.1 ? 1 : 0) + " %"),
    bytes(n) {
      if (n === null || n === undefined) return "–";
      const units = ["B", "KiB", "MiB", "GiB"];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
      return (i ? n.toFixed(1) : n) + " " + units[i];
    },
    uptime(s) {
      const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
      const m = Math.floor(s / 60) % 60, sec = Math.floor(s % 60);
      if (d) return `${d}d ${h}h`;
      if (h) return `${h}h ${m}m`;
      if (m) return `${m}m ${sec}s`;
      return `${sec}s`;
    },
    time: (t) => new Date(t * 1000).toLocaleTimeString("en-GB"),
  };

  // -- actions, confirmed in the page ---------------------------------------------
  function confirmThen(text, act) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    dialog.returnValue = "";
    dialog.onclose = () => { if (dialog.returnValue === "yes") act(); };
    dialog.showModal();
  }

  function toast(text, bad) {
    const box = $("toast");
    box.textContent = text;
    box.className = bad ? "toast bad" : "toast";
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, bad ? 8000 : 4000);
  }

  async function act(op, args, what) {
    try {
      const answer = await fetch("/api/action", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Otpy-Csrf": csrf },
        body: JSON.stringify({ op, args }),
        credentials: "same-origin",
      });
      const body = await answer.json();
      if (answer.ok) toast(`${what}: done`);
      else toast(`${what}: ${body.error}: ${body.message}`, true);
    } catch (err) {
      toast(`${what}: ${err}`, true);
    }
  }

  function actionButton(label, op, args, question, cls) {
    return el("button", {
      type: "button", class: "small " + (cls || ""), "data-action": op,
      onclick: (event) => {
        event.stopPropagation();
        confirmThen(question, () => act(op, args, `${label} ${args.join(" ")}`));
      },
    }, label);
  }

  function childActions(sup, child) {
    const buttons = [];
    if (child.kind === "worker" && (child.status === "running" || child.status === "suspended")) {
      buttons.push(child.status === "suspended"
        ? actionButton("resume", "resume", [child.id], `Resume ${child.id}? Its waiting messages are served in order.`)
        : actionButton("suspend", "suspend", [child.id], `Suspend ${child.id}? Its messages wait in its mailbox until it resumes.`));
    }
    if (child.status === "running" || child.status === "suspended") {
      buttons.push(actionButton("restart", "restart", [sup, child.id], `Restart ${child.id}? It is terminated, then started again from init (its state is lost).`));
      buttons.push(actionButton("terminate", "terminate_child", [sup, child.id], `Terminate ${child.id}? It stays stopped until restarted.`, "danger"));
    } else if (child.status === "not running") {
      buttons.push(actionButton("start", "restart_child", [sup, child.id], `Start ${child.id} again?`));
    }
    return el("span", { class: "actions" }, ...buttons);
  }

  // -- the tree --------------------------------------------------------------------
  function intensity(sup) {
    const used = sup.in_window, max = sup.max_restarts;
    const level = used > max ? "over" : used === max ? "full" : used > 0 ? "some" : "none";
    const bar = el("span", { class: "bar" }, el("span", { class: "fill " + level }));
    bar.firstChild.style.width = Math.min(100, (100 * used) / (max + 1)) + "%";
    return el("span", { class: "intensity", title: `restarts within the last ${sup.max_seconds} s, against max_restarts` },
      bar, el("span", { class: "in-window", text: `${used}/${max} in ${sup.max_seconds} s` }));
  }

  function renderSupervisor(sup) {
    const list = el("ul");
    for (const child of sup.children) {
      const item = el("li", { "data-child": child.id, class: child.kind });
      if (child.supervisor) {
        item.append(renderSupervisorBlock(child.supervisor, sup.name, child));
      } else {
        const row = el("div", { class: "row" },
          el("span", { class: "id", text: child.id }),
          el("span", { class: "badge " + child.status.replace(" ", "-"), text: child.status }),
          child.vsn !== null ? el("span", { class: "vsn", text: "vsn " + child.vsn }) : null,
          el("span", { class: "restarts-label" }, "restarts ", el("span", { class: "restarts", text: String(child.restarts) })),
          child.mailbox ? el("span", { class: "mailbox", text: `mailbox ${fmt.int(child.mailbox)}` }) : null,
          childActions(sup.name, child));
        if (child.kind === "worker") {
          row.classList.add("clickable");
          row.addEventListener("click", () => select(child.id));
        }
        item.append(row);
        if (child.last_crash) {
          item.append(el("div", { class: "crash last-crash", title: child.last_crash, text: "last crash: " + child.last_crash }));
        }
      }
      list.append(item);
    }
    if (sup.hidden > 0) {
      list.append(el("li", { class: "hidden-note", text: `… and ${fmt.int(sup.hidden)} more children (${fmt.int(sup.running)} of ${fmt.int(sup.specs)} running)` }));
    }
    return list;
  }

  // A supervisor: its name, strategy, restarts against its intensity window, and (for
  // a child supervisor) its own restarts and actions; then its children.
  function renderSupervisorBlock(sup, parent, asChild) {
    const head = el("div", { class: "row sup-head", "data-supervisor": sup.name },
      el("span", { class: "sup-name", text: sup.name }),
      el("span", { class: "strategy", text: sup.strategy }),
      intensity(sup),
      el("span", { class: "note", text: `${fmt.int(sup.running)}/${fmt.int(sup.specs)} running` }),
      asChild ? el("span", { class: "restarts-label" }, "restarts ", el("span", { class: "restarts", text: String(asChild.restarts) })) : null,
      asChild ? childActions(parent, asChild) : null);
    return el("div", { class: "supervisor" }, head, renderSupervisor(sup));
  }

  function renderTree(tree) {
    const box = $("tree");
    box.replaceChildren(tree ? renderSupervisorBlock(tree) : el("p", { class: "note", text: "the tree is not running" }));
  }

  // -- the server table ------------------------------------------------------------
  const columns = [
    ["name", (r) => r.name, "text"],
    ["status", (r) => r.status, "text"],
    ["mailbox", (r) => fmt.int(r.mailbox)],
    ["refused", (r) => fmt.int(r.refused)],
    ["restarts", (r) => fmt.int(r.restarts)],
    ["crashes", (r) => fmt.int(r.crashes)],
    ["steps_per_s", (r) => fmt.rate(r.steps_per_s)],
    ["step_s", (r) => fmt.seconds(r.step_s)],
    ["busy", (r) => fmt.pct(r.busy)],
    ["vsn", (r) => r.vsn, "text"],
  ];

  function renderTable(servers) {
    const rows = servers.rows.slice();
    const key = sortKey;
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      if (typeof x === "string" || typeof y === "string") return String(x).localeCompare(String(y));
      return (y ?? -1) - (x ?? -1) || a.name.localeCompare(b.name);
    });
    const limit = snapshot.limits.table_rows;
    const body = el("tbody");
    for (const row of rows.slice(0, limit)) {
      const tr = el("tr", { "data-server": row.name, class: row.name === selected ? "selected" : null,
        onclick: () => select(row.name) });
      for (const [, show, kind] of columns) {
        tr.append(el("td", { class: kind === "text" ? "text" : null, text: show(row) }));
      }
      body.append(tr);
    }
    $("server-table").tBodies[0].replaceWith(body);
    for (const th of document.querySelectorAll("#server-table th")) {
      th.classList.toggle("sorted", th.dataset.key === key);
    }
    $("servers-note").textContent = servers.filler
      ? `(the first ${Math.min(limit, rows.length)} of ${fmt.int(servers.total)}: none stands out)`
      : `(the top ${limit} of ${fmt.int(servers.total)} by the sorted column)`;
  }

  // -- one server ------------------------------------------------------------------
  function select(name) {
    selected = name;
    if (snapshot) renderTable(snapshot.servers);
    refreshDetail();
  }

  async function refreshDetail() {
    if (!selected || detailBusy) return;
    detailBusy = true;
    try {
      const answer = await fetch("/api/server?name=" + encodeURIComponent(selected), { credentials: "same-origin" });
      const body = await answer.json();
      renderDetail(answer.ok ? body : null, answer.ok ? null : body.message);
    } catch (err) {
      renderDetail(null, String(err));
    } finally {
      detailBusy = false;
    }
  }

  function renderDetail(d, error) {
    const box = $("detail");
    box.hidden = false;
    const close = el("button", { type: "button", class: "small quiet close", onclick: () => { selected = null; box.hidden = true; renderTable(snapshot.servers); } }, "close");
    if (!d) {
      box.replaceChildren(close, el("h3", { text: selected }), el("p", { class: "error", text: error }));
      return;
    }
    const facts = el("dl", { class: "facts" });
    for (const [label, value] of [
      ["pid", d.pid], ["class", d.class], ["vsn", d.vsn], ["supervisor", d.supervisor],
      ["status", d.status], ["mailbox", `${fmt.int(d.mailbox)} / ${fmt.int(d.max_mailbox)}`],
      ["refused", fmt.int(d.refused)], ["restarts", fmt.int(d.restarts)],
      ["steps/s", fmt.rate(d.steps_per_s)], ["step time", fmt.seconds(d.step_s)], ["loop", fmt.pct(d.busy)],
    ]) {
      facts.append(el("dt", { text: label }), el("dd", { text: value ?? "–" }));
    }
    const crashes = el("ol", { class: "crash-log" });
    for (const c of d.crash_log) {
      crashes.append(el("li", {}, el("span", { class: "when", text: fmt.time(c.time) }),
        el("span", { class: "crash", text: c.reason }),
        c.message ? el("span", { class: "note", text: " serving " + c.message }) : null));
    }
    const child = { id: d.name, kind: "worker", status: d.status === "suspended" ? "suspended" : "running" };
    box.replaceChildren(close,
      el("h3", {}, d.name, " ", childActions(d.supervisor, child)),
      facts,
      el("h4", { text: `state (${d.state_type})` }),
      el("pre", { class: "state", text: d.state }),
      el("h4", { text: "recent crashes" }),
      d.crash_log.length ? crashes : el("p", { class: "note", text: "none since the endpoint started" }));
  }

  // -- releases, events, figures ---------------------------------------------------
  function renderReleases(rel) {
    const box = $("releases");
    const list = el("ul", { class: "release-list" });
    if (!rel.history.length) list.append(el("li", { class: "note", text: "no release installed since the node started" }));
    rel.history.forEach((r, i) => {
      const newest = i === rel.history.length - 1;
      const some = r.some.join(", ") + (r.servers > r.some.length ? ", …" : "");
      list.append(el("li", { class: newest ? "newest" : null },
        el("span", { class: "vsn-big", text: "release " + r.vsn }),
        newest ? el("span", { class: "badge", text: "running" }) : null,
        el("span", { text: ` ${fmt.int(r.servers)} server${r.servers === 1 ? "" : "s"} (${some})` }),
        r.description ? el("span", { class: "note", text: " — " + r.description }) : null));
    });
    box.replaceChildren(list);
    const newest = rel.history[rel.history.length - 1];
    $("release").textContent = newest ? `release ${newest.vsn}` : "no release installed";
    const down = $("downgrade");
    down.disabled = !newest || !!rel.installing;
    down.textContent = newest ? `Downgrade from ${newest.vsn}…` : "Downgrade…";
    const banner = $("installing");
    if (rel.installing) {
      const i = rel.installing;
      const progress = i.total ? `${fmt.int(i.done)} of ${fmt.int(i.total)} servers migrated` : `${fmt.int(i.done)} servers planned`;
      banner.textContent = `${i.downgrade ? "Downgrade from" : "Upgrade to"} release ${i.release} in progress: ${i.phase}, ${progress}, ${fmt.seconds(i.seconds)}`;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  function renderEvents(events) {
    const list = $("events");
    list.replaceChildren(...events.map((e) => el("li", { class: e.event },
      el("span", { class: "when", text: fmt.time(e.time) }),
      el("span", { class: "what", text: e.event.replace(/_/g, " ") }),
      el("span", { class: "who", text: e.who }),
      el("span", { class: "detail", title: e.detail, text: e.detail }))));
    if (!events.length) list.append(el("li", { class: "note", text: "nothing yet" }));
  }

  function renderFigures(n) {
    $("node-name").textContent = n.name;
    $("uptime").textContent = fmt.uptime(n.uptime);
    $("lag").textContent = `${fmt.ms(n.lag_ms)} (${fmt.ms(n.lag_worst_ms)})`;
    const busy = $("busy");
    busy.textContent = fmt.pct(n.loop_busy) + (n.sampling === "gil" ? " (sampling: gil)" : "");
    busy.title = n.sampling === "gil"
      ? "sampled by a thread, which sees the loop mostly while it polls for I/O: busy servers look less busy"
      : "the share of the loop's time spent in callbacks, sampled";
    $("rss").textContent = fmt.bytes(n.rss);
    $("servers").textContent = fmt.int(n.servers);
    $("supervisors").textContent = fmt.int(n.supervisors);
    $("queued").textContent = fmt.int(n.queued);
    $("refused").textContent = fmt.int(n.refused);
    $("crashes").textContent = `${fmt.int(n.crashes)} (${fmt.int(n.restarts)} restarts)`;
    $("connections").textContent = fmt.int(n.connections);
  }

  function render(view) {
    snapshot = view;
    renderFigures(view.node);
    renderTree(view.tree);
    renderTable(view.servers);
    renderReleases(view.releases);
    renderEvents(view.events);
    document.body.dataset.seq = view.seq;
    refreshDetail();
  }

  // -- wiring ----------------------------------------------------------------------
  for (const th of document.querySelectorAll("#server-table th")) {
    th.addEventListener("click", () => {
      sortKey = th.dataset.key;
      if (snapshot) renderTable(snapshot.servers);
    });
  }
  $("downgrade").addEventListener("click", () => {
    const newest = snapshot && snapshot.releases.history.slice(-1)[0];
    if (!newest) return;
    confirmThen(`Downgrade from release ${newest.vsn}? Every server it upgraded goes back to its older code, migrated by code_change; all or nothing.`,
      () => act("downgrade", [], `downgrade from ${newest.vsn}`));
  });

  const live = $("live");
  const stream = new EventSource("/events");
  stream.addEventListener("open", () => { live.textContent = "live"; live.className = "live"; });
  stream.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "live waiting"; });
  stream.addEventListener("snapshot", (event) => render(JSON.parse(event.data)));
  stream.addEventListener("logout", () => { stream.close(); location.reload(); });
  stream.addEventListener("bye", () => { live.textContent = "node stopping"; live.className = "live waiting"; });
})();
