// The labeling page. Every prompt and response is inserted with textContent: model output
// is shown as text, never interpreted as HTML.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const RUBRIC = [["helpful", "Helpful"], ["honest", "Honest"], ["harmless", "Harmless"], ["concise", "Concise"]];
  const $ = (id) => document.getElementById(id);
  const DRAG_TYPE = "application/x-tether-response";
  let item = null, ranked = [], submission = null, started = 0, busy = false;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function promptText(p) {
    if (typeof p === "string") return p;
    return p.map((m) => m.role + ": " + m.content).join("\n");
  }

  function newSubmissionId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12);
  }

  async function load() {
    setStatus("");
    const r = await fetch("/api/next", {credentials: "same-origin"});
    if (!r.ok) { setStatus("Could not load the next item (" + r.status + ")."); return; }
    const body = await r.json();
    showProgress(body.progress);
    item = body.item;
    if (!item) {  // nothing now: look again now and then (new items, or a lapsed turn of someone else)
      $("main").hidden = true; $("done").hidden = false;
      setTimeout(load, 15000);
      return;
    }
    $("main").hidden = false; $("done").hidden = true;
    ranked = [];
    submission = newSubmissionId();
    started = performance.now();
    $("comment").value = "";
    document.querySelectorAll("#rubric input").forEach((i) => { i.checked = false; });
    $("prompt").textContent = promptText(item.prompt);
    $("item-id").textContent = "#" + item.id;
    render();
  }

  function showProgress(p) {
    if (!p) return;
    $("progress").textContent = "you: " + p.mine + " labelled, " + p.left_for_me + " left · all: " +
      p.labels + " of " + p.labels_needed + " labels";
  }

  function setStatus(text) { $("status").textContent = text; }

  function card(idx, rankPos) {
    const li = el("li", "card");
    li.draggable = true;
    li.dataset.idx = String(idx);
    const badge = el("span", "badge", String(idx + 1));
    li.appendChild(badge);
    if (rankPos !== undefined) {
      const entry = ranked[rankPos];
      if (rankPos > 0) {
        const tie = el("button", "tie" + (entry.tie ? " on" : ""), entry.tie ? "= tied" : "tie ↑");
        tie.type = "button";
        tie.title = "tie with the response above";
        tie.addEventListener("click", (ev) => { ev.stopPropagation(); entry.tie = !entry.tie; render(); });
        li.appendChild(tie);
      }
      if (entry.tie) li.classList.add("tied");
    }
    li.appendChild(el("div", "text", item.responses[idx]));
    li.addEventListener("dragstart", (ev) => {
      ev.dataTransfer.setData(DRAG_TYPE, String(idx));
      ev.dataTransfer.setData("text/plain", String(idx));
      ev.dataTransfer.effectAllowed = "move";
    });
    if (rankPos === undefined) li.addEventListener("click", () => rank(idx));
    return li;
  }

  function render() {
    const pool = $("pool"), list = $("ranked");
    pool.replaceChildren();
    list.replaceChildren();
    const inRank = new Set(ranked.map((e) => e.idx));
    item.responses.forEach((_, idx) => { if (!inRank.has(idx)) pool.appendChild(card(idx)); });
    ranked.forEach((e, pos) => list.appendChild(card(e.idx, pos)));
    $("submit").disabled = busy || ranked.length !== item.responses.length;
    $("skip").disabled = busy;
    $("undo").disabled = busy || !ranked.length;
  }

  // a response that moves or leaves loses its tie, and so does the one that was tied to it
  function detach(pos) {
    if (pos + 1 < ranked.length) ranked[pos + 1].tie = false;
    ranked[pos].tie = false;
  }

  function rank(idx, at) {
    if (!item || idx < 0 || idx >= item.responses.length) return;
    const old = ranked.findIndex((e) => e.idx === idx);
    let entry = {idx: idx, tie: false};
    if (old >= 0) { detach(old); entry = ranked[old]; ranked.splice(old, 1); if (at !== undefined && old < at) at -= 1; }
    if (at === undefined || at > ranked.length) ranked.push(entry); else ranked.splice(at, 0, entry);
    if (ranked.length) ranked[0].tie = false;
    render();
  }

  function unrank(idx) {
    const pos = ranked.findIndex((e) => e.idx === idx);
    if (pos >= 0) detach(pos);
    ranked = ranked.filter((e) => e.idx !== idx);
    if (ranked.length) ranked[0].tie = false;
    render();
  }

  function rankingPayload() {
    const out = [];
    ranked.forEach((e, pos) => {
      if (pos > 0 && e.tie) {
        const last = out[out.length - 1];
        out[out.length - 1] = (Array.isArray(last) ? last : [last]).concat([e.idx]);
      } else {
        out.push(e.idx);
      }
    });
    return out;
  }

  function rubricPayload() {
    const out = {};
    RUBRIC.forEach(([key]) => {
      const checked = document.querySelector('input[name="rubric-' + key + '"]:checked');
      if (checked) out[key] = Number(checked.value);
    });
    return out;
  }

  async function send(skipped) {
    if (!item || busy) return;
    if (!skipped && ranked.length !== item.responses.length) { setStatus("Rank every response first."); return; }
    busy = true;
    render();
    const body = {item_id: item.id, submission: submission, skipped: skipped,
                  seconds: (performance.now() - started) / 1000, comment: $("comment").value};
    if (!skipped) { body.ranking = rankingPayload(); body.rubric = rubricPayload(); }
    try {
      const r = await fetch("/api/labels", {method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)});
      if (r.ok) { item = null; await load(); busy = false; if (item) render(); return; }
      const err = await r.json().catch(() => ({}));
      setStatus("Not saved: " + (err.error || r.status));
    } catch (e) {
      setStatus("Not saved (network): " + e + " — press Enter to retry.");
    }
    busy = false;
    render();
  }

  function buildRubric() {
    const box = $("rubric");
    RUBRIC.forEach(([key, label]) => {
      const row = el("div", "rubric-row");
      row.appendChild(el("span", "rubric-label", label));
      for (let v = 1; v <= 5; v++) {
        const id = "rubric-" + key + "-" + v;
        const input = el("input");
        input.type = "radio"; input.name = "rubric-" + key; input.value = String(v); input.id = id;
        const lab = el("label", "", String(v));
        lab.htmlFor = id;
        row.appendChild(input); row.appendChild(lab);
      }
      box.appendChild(row);
    });
  }

  function dragged(ev) {
    const raw = ev.dataTransfer.getData(DRAG_TYPE);
    const idx = Number(raw);
    return raw !== "" && Number.isInteger(idx) ? idx : null;
  }

  function dropTarget(list, ev) {
    const cards = Array.from(list.querySelectorAll(".card"));
    for (let i = 0; i < cards.length; i++) {
      const box = cards[i].getBoundingClientRect();
      if (ev.clientY < box.top + box.height / 2) return i;
    }
    return cards.length;
  }

  function wireDrops() {
    const list = $("ranked"), pool = $("pool");
    [list, pool].forEach((zone) => zone.addEventListener("dragover", (ev) => { ev.preventDefault(); }));
    list.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const idx = dragged(ev);
      if (idx !== null) rank(idx, dropTarget(list, ev));
    });
    pool.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const idx = dragged(ev);
      if (idx !== null) unrank(idx);
    });
  }

  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target && ev.target.tagName) || "";
    if (tag === "TEXTAREA" || (tag === "INPUT" && ev.target.type !== "radio") || !item) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.repeat || busy) { if (ev.key !== "Tab") ev.preventDefault(); return; }  // no auto-repeat, nothing mid-send
    if (ev.key === " " && tag === "BUTTON") { ev.preventDefault(); return; }  // Space never presses a focused button
    if (/^[1-9]$/.test(ev.key)) { rank(Number(ev.key) - 1); ev.preventDefault(); }
    else if (ev.key === "t" || ev.key === "T") {
      if (ranked.length > 1) { const last = ranked[ranked.length - 1]; last.tie = !last.tie; render(); }
      ev.preventDefault();
    } else if (ev.key === "Backspace") { if (ranked.length) { ranked.pop(); render(); } ev.preventDefault(); }
    else if (ev.key === "Enter") { send(false); ev.preventDefault(); }
    else if (ev.key === "s" || ev.key === "S") { send(true); ev.preventDefault(); }
  });

  $("submit").addEventListener("click", (ev) => { ev.currentTarget.blur(); send(false); });
  $("skip").addEventListener("click", (ev) => { ev.currentTarget.blur(); send(true); });
  $("undo").addEventListener("click", (ev) => {
    ev.currentTarget.blur();
    if (ranked.length) { ranked.pop(); render(); }
  });
  buildRubric();
  wireDrops();
  load();
})();
