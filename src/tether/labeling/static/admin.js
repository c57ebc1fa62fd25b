"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v)) ? "—" : (typeof v === "number" ? v.toFixed(d === undefined ? 3 : d) : String(v));

  function row(table, cells, head) {
    const tr = document.createElement("tr");
    cells.forEach((c) => { const td = document.createElement(head ? "th" : "td"); td.textContent = c; tr.appendChild(td); });
    table.appendChild(tr);
  }

  async function load() {
    const r = await fetch("/api/admin/stats", {credentials: "same-origin"});
    if (!r.ok) { $("progress-text").textContent = "Could not load the statistics (" + r.status + ")."; return; }
    const s = await r.json();
    const p = s.progress;
    const share = p.labels_needed ? Math.min(1, p.labels / p.labels_needed) : 0;
    $("progress-fill").style.width = (100 * share).toFixed(1) + "%";
    $("progress-text").textContent = p.labels + " of " + p.labels_needed + " labels (" + p.items + " items × " +
      p.overlap + " labelers each); " + p.items_complete + " items complete.";
    const a = $("agreement");
    a.replaceChildren();
    const g = s.agreement || {};
    row(a, ["items with several labelers", fmt(g.items_multi, 0)]);
    row(a, ["pairwise comparisons", fmt(g.pairs_compared, 0)]);
    row(a, ["percent agreement", fmt(g.percent_agreement)]);
    row(a, ["Cohen's κ (mean over labeler pairs)", fmt(g.cohen_kappa_mean)]);
    row(a, ["Krippendorff's α (nominal)", fmt(g.krippendorff_alpha)]);
    const t = $("labelers");
    t.replaceChildren();
    row(t, ["labeler", "labels", "skipped", "median seconds", "agreement with the others", "pairs scored"], true);
    s.labelers.forEach((l) => row(t, [l.name, fmt(l.labels, 0), fmt(l.skipped, 0), fmt(l.median_seconds, 1),
      fmt(l.agreement_with_consensus), fmt(l.pairs_scored, 0)]));
  }
  load();
  setInterval(load, 10000);
})();
