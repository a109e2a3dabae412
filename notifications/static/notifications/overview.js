// The admin's overview (/admin/overview/): refreshes its parts without a reload.
//
// Every data-refresh-ms it fetches data-parts-url (JSON: {parts: {name: html}}) and swaps each
// part whose HTML changed (a part that did not change keeps its DOM, so a button under the
// pointer stays put). Web instances and workers this page has seen stay listed as "gone" once
// their lease is removed (a stopped process removes its own; a lapsed one is removed by a live
// instance), until FORGET_MS later. A failed refresh keeps the last state and says so.
(function () {
  "use strict";

  var FORGET_MS = 10 * 60 * 1000;
  var root = document.querySelector(".rt-overview");
  if (!root) return;
  var url = root.dataset.partsUrl;
  var interval = parseInt(root.dataset.refreshMs, 10) || 3000;
  var status = document.getElementById("overview-status");
  var seen = new Map(); // "kind:instance" -> {html, kind, lastSeen}
  var lastHtml = {};
  var timer = null;
  var inFlight = false;

  function key(row) {
    return row.dataset.kind + ":" + row.dataset.instance;
  }

  function setStatus(state, text) {
    status.dataset.state = state;
    status.querySelector(".rt-status-text").textContent = text;
  }

  function timeOf(date) {
    return date.toISOString().slice(11, 19) + " UTC";
  }

  // Remember the rows shown now; put back, marked gone, those no longer in the part.
  function keepGone(part) {
    var now = Date.now();
    var present = new Set();
    part.querySelectorAll("tr[data-instance]").forEach(function (row) {
      present.add(key(row));
      if (row.dataset.state !== "gone") {
        seen.set(key(row), { html: row.outerHTML, kind: row.dataset.kind, lastSeen: now });
      }
    });
    seen.forEach(function (entry, name) {
      if (present.has(name)) return;
      if (now - entry.lastSeen > FORGET_MS) {
        seen.delete(name);
        return;
      }
      var body = part.querySelector('tbody[data-kind="' + entry.kind + '"]');
      if (!body) return;
      var holder = document.createElement("tbody");
      holder.innerHTML = entry.html;
      var row = holder.firstElementChild;
      row.dataset.state = "gone";
      row.classList.add("rt-remembered");
      var badge = row.querySelector(".state .rt-badge");
      if (badge) {
        badge.textContent = "gone";
        badge.className = "rt-badge rt-gone";
      }
      var renewed = row.querySelector(".renewed");
      if (renewed) renewed.textContent = "lease gone; last seen " + timeOf(new Date(entry.lastSeen));
      var empty = body.querySelector(".rt-empty");
      if (empty) empty.remove();
      body.appendChild(row);
    });
  }

  function apply(parts) {
    Object.keys(parts).forEach(function (name) {
      var html = parts[name];
      if (lastHtml[name] === html) return;
      var part = root.querySelector('[data-part="' + name + '"]');
      if (!part) return;
      lastHtml[name] = html;
      part.innerHTML = html;
    });
    // Gone rows are re-added on every refresh: the server's part never has them.
    var processes = root.querySelector('[data-part="processes"]');
    if (processes) keepGone(processes);
  }

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(refresh, delay);
  }

  function refresh() {
    if (inFlight) return;
    if (document.hidden) {
      schedule(interval); // nobody looks: no load on the server, a refresh as soon as someone does
      return;
    }
    inFlight = true;
    var controller = "AbortController" in window ? new AbortController() : null;
    var abort = controller ? setTimeout(function () { controller.abort(); }, interval * 3) : null;
    fetch(url, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      cache: "no-store",
      signal: controller ? controller.signal : undefined,
    })
      .then(function (response) {
        if (response.status === 403) throw new Error("signed out: reload the page to sign in again");
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (body) {
        // Processes first: the next refresh compares against what is shown now.
        lastHtml.processes = null;
        apply(body.parts);
        setStatus("live", "Updated " + timeOf(new Date(body.generated_at)));
        status.dataset.generatedAt = body.generated_at;
        schedule(interval);
      })
      .catch(function (error) {
        setStatus("stale", "Refresh failed (" + (error.message || error) + "); showing " +
          "what was last read, retrying");
        schedule(Math.min(interval * 2, 15000));
      })
      .finally(function () {
        if (abort) clearTimeout(abort);
        inFlight = false;
      });
  }

  var first = root.querySelector('[data-part="processes"]');
  if (first) keepGone(first);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) schedule(0);
  });
  schedule(interval);
})();
