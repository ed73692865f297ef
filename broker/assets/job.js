// The job page's live log. Lines arrive as JSON (see broker/src/web/job.rs) and are inserted
// with textContent only: nothing a job prints becomes markup.
"use strict";
(function () {
  const log = document.getElementById("log");
  if (!log) return;
  const job = log.dataset.job;
  const box = document.getElementById("log-lines");
  const earlier = document.getElementById("log-earlier");
  const search = document.getElementById("log-search");
  const times = document.getElementById("log-times");
  const stateBadge = document.getElementById("state");
  const reason = document.getElementById("reason");
  let first = Number(log.dataset.logBytes);
  // Where appended lines go: the log, or an open ::group:: section at its end.
  let openGroup = null;

  function lineElement(line) {
    const row = document.createElement("div");
    row.className = "line s" + line.s;
    row.id = "o" + line.o;
    const link = document.createElement("a");
    link.className = "ln";
    link.href = "#o" + line.o;
    link.textContent = "#";
    link.setAttribute("aria-label", "Link to this line");
    const time = document.createElement("time");
    time.className = "ts";
    time.textContent = line.t;
    const text = document.createElement("span");
    text.className = "text";
    for (const [classes, part] of line.g) {
      const span = document.createElement("span");
      if (classes) span.className = classes;
      span.textContent = part;
      text.appendChild(span);
    }
    row.append(link, time, text);
    row.dataset.plain = line.g.map((g) => g[1]).join("");
    matches(row);
    return row;
  }

  // Builds the elements of `lines`, folding `::group::TITLE` ... `::endgroup::` sections.
  // `group` is the section open before the first line; returns the section open after.
  function build(lines, target, group) {
    for (const line of lines) {
      const plain = line.g.map((g) => g[1]).join("");
      if (plain.startsWith("::group::")) {
        const details = document.createElement("details");
        const summary = document.createElement("summary");
        summary.textContent = plain.slice("::group::".length) || "group";
        details.appendChild(summary);
        target.appendChild(details);
        group = details;
        continue;
      }
      if (plain.startsWith("::endgroup::")) {
        group = null;
        continue;
      }
      (group || target).appendChild(lineElement(line));
    }
    return group;
  }

  function atBottom() {
    return box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  }

  function append(lines) {
    const follow = atBottom();
    openGroup = build(lines, box, openGroup && openGroup.isConnected ? openGroup : null);
    if (follow) box.scrollTop = box.scrollHeight;
  }

  function prepend(page) {
    const fragment = document.createDocumentFragment();
    build(page.lines, fragment, null);
    box.insertBefore(fragment, box.firstChild);
    first = page.start;
    earlier.hidden = first === 0;
  }

  async function loadBefore(before, then) {
    const response = await fetch(`/jobs/${job}/log/lines?before=${before}`, { credentials: "same-origin" });
    if (!response.ok) return;
    then(await response.json());
  }

  function matches(row) {
    const query = search.value.toLowerCase();
    row.classList.toggle("hidden", query !== "" && !row.dataset.plain.toLowerCase().includes(query));
    if (query !== "" && !row.classList.contains("hidden") && row.parentElement && row.parentElement.tagName === "DETAILS") {
      row.parentElement.open = true;
    }
  }

  search.addEventListener("input", () => box.querySelectorAll(".line").forEach(matches));
  times.addEventListener("change", () => log.classList.toggle("show-times", times.checked));
  earlier.addEventListener("click", () => loadBefore(first, prepend));

  function setState(update) {
    stateBadge.textContent = update.state;
    stateBadge.className = "state state-" + update.state;
    if (update.reason) {
      reason.textContent = update.reason;
      reason.hidden = false;
    }
  }

  function live(offset) {
    const source = new EventSource(`/jobs/${job}/log/stream?offset=${offset}`);
    source.addEventListener("lines", (event) => append(JSON.parse(event.data).lines));
    source.addEventListener("state", (event) => setState(JSON.parse(event.data)));
    source.addEventListener("end", () => source.close());
  }

  const end = first;
  loadBefore(end, (page) => {
    prepend(page);
    box.scrollTop = box.scrollHeight;
    if (location.hash) {
      const target = document.getElementById(location.hash.slice(1));
      if (target) target.scrollIntoView();
    }
    live(end);
  });
})();
