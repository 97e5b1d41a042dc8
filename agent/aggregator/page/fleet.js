"use strict";
// The fleet view, redrawn from each server-sent event. What agents report is
// written as text, never as markup.
(function () {
  const networks = document.getElementById("networks");
  const state = document.getElementById("state");
  const updated = document.getElementById("updated");

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    e.append(...children);
    return e;
  }

  function table(head, rows) {
    return el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))), rows);
  }

  function short(hash) {
    return hash.length > 14 ? hash.slice(0, 8) + "…" + hash.slice(-4) : hash;
  }

  function time(ms) {
    return ms ? new Date(ms).toLocaleTimeString() : "";
  }

  function nodes(n) {
    const rows = el("tbody", {});
    for (const m of n.nodes) {
      rows.append(el("tr", { "data-node": m.node_id, "data-status": m.status },
        el("td", {}, m.node_id),
        el("td", { class: "num" }, String(m.height)),
        el("td", { class: "num" }, String(m.lag)),
        el("td", { class: "hash", title: m.hash }, short(m.hash)),
        el("td", {}, m.agrees ? "yes" : "NO"),
        el("td", { class: "status" }, m.status)));
    }
    return table(["node", "height", "lag", "hash", "agrees", "status"], rows);
  }

  function findings(n) {
    if (n.open_findings.length === 0) {
      return el("p", { class: "empty", "data-findings": "none" }, "no open findings");
    }
    const rows = el("tbody", {});
    for (const f of n.open_findings) {
      const who = f.node_id || "@" + n.network;
      rows.append(el("tr", { "data-finding": f.id, "data-kind": f.kind, "data-node": who, "data-severity": f.severity },
        el("td", {}, time(f.opened_at_unix_ms)),
        el("td", {}, who),
        el("td", {}, f.kind),
        el("td", {}, f.severity),
        el("td", { class: "verdict" }, f.verdict),
        el("td", { class: "wrap" }, f.summary),
        el("td", { class: "wrap" }, f.verdict_reason)));
    }
    return table(["since", "node", "finding", "severity", "fault", "what", "why"], rows);
  }

  function network(n) {
    return el("section", { "data-network": n.network },
      el("h2", {}, `${n.network} (${n.chain}): fleet head ${n.fleet_head}`),
      nodes(n),
      el("h3", {}, "open findings"),
      findings(n));
  }

  function render(view) {
    const started = performance.now();
    const page = document.createDocumentFragment();
    if (view.networks.length === 0) {
      page.append(el("p", { class: "empty" }, "no node has reported yet"));
    }
    for (const n of view.networks) page.append(network(n));
    networks.replaceChildren(page);
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    // Layout included: what a person waits for.
    void networks.offsetHeight;
    const views = window.outpostRender ? window.outpostRender.views + 1 : 1;
    window.outpostRender = { ms: performance.now() - started, views };
  }
  window.outpostRenderView = render;

  const events = new EventSource("events");
  events.addEventListener("fleet", (e) => render(JSON.parse(e.data)));
  events.onopen = () => {
    state.textContent = "live";
    state.dataset.state = "live";
  };
  events.onerror = () => {
    state.textContent = "reconnecting…";
    state.dataset.state = "down";
  };
})();
