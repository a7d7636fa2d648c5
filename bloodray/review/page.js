// The bloodray review page (bloodray/review/page.py embeds this file and its data).
// Everything runs in the browser: no server, no network. Unsaved work is kept in localStorage
// under the run's key until "Download decisions" writes the decisions file for `bloodray review import`.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("review-data").textContent);
  const R = D.rules;
  const STORE = "bloodray-review:" + D.output_uri + ":" + D.run_id;
  const UNID = D.unidentified;

  // ------------------------------------------------------------------ differential (port of
  // bloodray.nightly.differential.compute_differentials for one sample; thresholds come from D.rules)
  function clip01(x) { return Math.min(Math.max(x, 0), 1); }

  // As wilson_interval of bloodray/nightly/intervals.py: Wilson's score interval with Newcombe's continuity correction.
  function wilson(k, n, z) {
    if (!(n > 0)) return [NaN, NaN];
    return scoreInterval(k / n, n, 0.0, z);
  }

  // Interval (fractions) of class k's share of the classes in `members`, as share_bounds of
  // bloodray/nightly/intervals.py (share_bounds): Wilson on the counts, or, with rules.confusion, on the
  // misclassification-corrected share with its extra variance. Same operations, same order.
  // kv: the part of cv a reviewer verified (taken as true, not corrected).
  function shareBounds(cv, k, members, rules, kv) {
    const K = cv.length;
    let nMembers = 0;
    for (let j = 0; j < K; j++) if (members[j]) nMembers += cv[j];
    const conf = rules.confusion;
    if (!conf) return wilson(cv[k], nMembers, rules.z);
    const finite = (x) => (isNaN(x) ? 0 : x);  // numpy's nan_to_num for the NaNs met here
    const m = conf.inverse_t, rates = conf.posterior_rates, nPost = conf.posterior_cells;
    const machine = cv.map((x, j) => x - kv[j]);
    const total = cv.reduce((s, x) => s + x, 0);
    const nMachine = machine.reduce((s, x) => s + x, 0);
    const q = machine.map((x) => finite(x / nMachine));
    let pm = m.map((row) => Math.max(row.reduce((s, mij, j) => s + q[j] * mij, 0), 0));
    const pSum = pm.reduce((s, x) => s + x, 0);
    pm = pm.map((x) => finite(x / pSum));
    const weight = nMachine / total;
    const p = pm.map((x, j) => kv[j] / total + weight * x);
    let shareOf = 0;
    for (let j = 0; j < K; j++) if (members[j]) shareOf += p[j];
    const f = p[k] / shareOf;
    const grad = p.map((_, j) => ((j === k ? 1 : 0) - f * (members[j] ? 1 : 0)) / shareOf);
    const u = q.map((_, j) => weight * grad.reduce((s, gi, i) => s + gi * m[i][j], 0));
    const dot = (a, b) => a.reduce((s, x, j) => s + x * b[j], 0);
    const uu = u.map((x) => x * x);
    const varCounts = finite((dot(uu, q) - dot(u, q) ** 2) / nMachine);
    let varConfusion = 0;
    for (let i = 0; i < K; i++) varConfusion += pm[i] * pm[i] * (dot(uu, rates[i]) - dot(u, rates[i]) ** 2) / nPost[i];
    const nCells = shareOf * total;
    const extra = Math.max(varCounts + varConfusion - f * (1.0 - f) / nCells, 0.0);
    if (!(nMembers > 0) || !(shareOf > 0)) return [NaN, NaN];
    return scoreInterval(f, nCells, extra, rules.z);
  }

  // As score_interval of bloodray/nightly/intervals.py: the score interval of a share f of n cells with `extra`
  // variance besides the binomial and Newcombe's continuity correction h = 1/(2n): the lower bound is the plain one
  // of f - h, the upper the plain one of f + h.
  function scoreInterval(f, n, extra, z) {
    const z2 = z * z;
    const scale = 1.0 + z2 / n;
    const h = 0.5 / n;
    const fLo = f - h, fHi = f + h;
    const lo = fLo <= 0 ? 0.0 : clip01((fLo + z2 / (2.0 * n)) / scale
      - z / scale * Math.sqrt(fLo * (1.0 - fLo) / n + z2 / (4.0 * n * n) + scale * extra));
    const hi = fHi >= 1 ? 1.0 : clip01((fHi + z2 / (2.0 * n)) / scale
      + z / scale * Math.sqrt(fHi * (1.0 - fHi) / n + z2 / (4.0 * n * n) + scale * extra));
    return [lo, hi];
  }

  function rangeFlags(lo, hi, rng) {
    if (!rng) return [false, false];
    return [rng.flag_low ? hi < rng.low : false, lo > rng.high];  // NaN compares false: no flag
  }

  // counts: {class: n}; wbcCount: 10^9/L or null; shifted: the run's domain-shift alarm for the sample;
  // verified: {class: n} of those counts a reviewer gave (optional; with the model's confusion they are not corrected).
  function differential(counts, rules, wbcCount, shifted, shiftFlag, verified) {
    const c = {};
    for (const name of rules.classes) c[name] = counts[name] || 0;
    const kv = rules.classes.map((name) => (verified && verified[name]) || 0);
    const nWbc = rules.wbc_classes.reduce((s, name) => s + c[name], 0);
    const z = rules.z;
    const out = {n_wbc: nWbc};
    const bounds = {};
    const pct = (k) => (nWbc > 0 ? k * 100.0 / Math.max(nWbc, 1) : NaN);
    const cv = rules.classes.map((name) => c[name]);
    const wbcMembers = rules.classes.map((name) => rules.wbc_classes.includes(name));
    const index = (name) => rules.classes.indexOf(name);
    for (const name of rules.differential_classes) {
      out["pct_" + name] = pct(c[name]);
      bounds[name] = shareBounds(cv, index(name), wbcMembers, rules, kv);
    }
    out.ig_per_100_wbc = pct(c.ig);
    bounds.ig = shareBounds(cv, index("ig"), wbcMembers, rules, kv);
    const erb = c.erythroblast;
    out.erythroblast_per_100_wbc = pct(erb);
    const q = shareBounds(cv, index("erythroblast"), wbcMembers.map((w, j) => w || j === index("erythroblast")),
                          rules, kv);
    const erbBounds = q.map((v) => (nWbc > 0 ? v / (1.0 - v) : NaN));
    out.platelet_count = c.platelet;
    for (const name of rules.differential_classes) {
      out["pct_" + name + "_lo"] = 100.0 * bounds[name][0];
      out["pct_" + name + "_hi"] = 100.0 * bounds[name][1];
    }
    out.ig_per_100_wbc_lo = 100.0 * bounds.ig[0];
    out.ig_per_100_wbc_hi = 100.0 * bounds.ig[1];
    out.erythroblast_per_100_wbc_lo = 100.0 * erbBounds[0];
    out.erythroblast_per_100_wbc_hi = 100.0 * erbBounds[1];
    const wbc = wbcCount === null || wbcCount === undefined ? NaN : wbcCount;
    out.wbc_count_10e9_per_l = wbc;
    for (const name of rules.differential_classes) {
      out["abs_" + name] = wbc * (out["pct_" + name] / 100.0);
      out["abs_" + name + "_lo"] = wbc * bounds[name][0];
      out["abs_" + name + "_hi"] = wbc * bounds[name][1];
    }
    const useAbs = !isNaN(wbc) && nWbc > 0 && Object.keys(rules.absolute_ranges).length > 0;
    out.flag_basis = useAbs ? "absolute" : "percent";
    out.flags_confusion_corrected = !!rules.confusion;
    for (const name of rules.differential_classes) {
      const p = rangeFlags(out["pct_" + name + "_lo"], out["pct_" + name + "_hi"], rules.ranges[name]);
      const absRng = rules.absolute_ranges[name];
      const a = rangeFlags(out["abs_" + name + "_lo"], out["abs_" + name + "_hi"], absRng);
      const byAbs = useAbs && !!absRng;
      out["flag_" + name + "_low"] = byAbs ? a[0] : p[0];
      out["flag_" + name + "_high"] = byAbs ? a[1] : p[1];
    }
    out.flag_erythroblasts = out.erythroblast_per_100_wbc_lo > rules.erythroblast_per_100_wbc;
    out.flag_ig = out.ig_per_100_wbc_lo > rules.ig_percent;
    out.flag_low_wbc_count = nWbc < rules.min_wbc;
    const cols = Object.keys(rules.flag_labels);
    out.flags = cols.filter((col) => out[col]).map((col) => rules.flag_labels[col]);
    // As bloodray.nightly.shift.mark_unverified: a sample under the alarm keeps its flags, behind the alarm's,
    // marked unverified.
    if (shifted) out.flags.unshift(shiftFlag);
    out.any_flag = out.flags.length > 0;
    out.flags_unverified = !!shifted;
    return out;
  }

  // ------------------------------------------------------------------ state
  const cellsByUri = new Map();
  D.samples.forEach((s, si) => s.cells.forEach((c) => { c.sample = si; cellsByUri.set(c.uri, c); }));
  let state = {reviewer: "", decisions: {}, signoffs: {}, current: 0, downloaded: null, changes: 0};
  let restored = null;
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "null");
    if (saved && saved.run_id === D.run_id) {
      state = Object.assign(state, saved.state);
      // Decisions for cells no longer on the page (another export), and those already imported (this page
      // was exported again after the import), are not offered again.
      const same = (a, b) => Date.parse(a) === Date.parse(b);
      for (const [uri, d] of Object.entries(state.decisions)) {
        const c = cellsByUri.get(uri);
        if (!c || (c.prev && c.prev.cls === d.cls && c.prev.reviewer === d.reviewer && same(c.prev.at, d.at))) {
          delete state.decisions[uri];
        }
      }
      for (const s of D.samples) {
        const mine = state.signoffs[s.sample_id];
        if (mine && s.signoff && s.signoff.status === mine.status && s.signoff.reviewer === mine.reviewer &&
            same(s.signoff.at, mine.at)) delete state.signoffs[s.sample_id];
      }
      restored = [Object.keys(state.decisions).length, Object.keys(state.signoffs).length];
    } else {
      state.reviewer = localStorage.getItem("bloodray-review:reviewer") || "";
    }
  } catch (e) { /* no storage (private window): the page still works, unsaved */ }
  state.current = Math.min(state.current || 0, Math.max(D.samples.length - 1, 0));
  let selected = null;  // uri of the selected cell

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify({run_id: D.run_id, state: state}));
      localStorage.setItem("bloodray-review:reviewer", state.reviewer);
    } catch (e) { /* see above */ }
  }

  function now() { return new Date().toISOString().replace(/\.\d{3}Z$/, "Z"); }

  // The class a cell counts as now: this page's decision, else an imported review, else the machine's.
  function verdict(c) {
    const d = state.decisions[c.uri];
    if (d) return {cls: d.cls, source: "page", reviewer: d.reviewer};
    if (c.prev) return {cls: c.prev.cls, source: "imported", reviewer: c.prev.reviewer};
    return {cls: c.cls, source: "machine"};
  }

  // {class: n} counted now, and of those the ones a reviewer gave (verified: no model error to correct).
  function sampleCounts(s, verifiedOnly) {
    const counts = {};
    for (const name of R.classes) counts[name] = 0;
    for (const c of s.cells) {
      const v = verdict(c);
      // As in the job and the verified view: unidentified cells count only once a reviewer gave them a class.
      if (v.source === "machine" && (c.status === UNID || verifiedOnly)) continue;
      if (v.cls in counts) counts[v.cls] += 1;
    }
    return counts;
  }

  function liveDifferential(s) {
    return differential(sampleCounts(s), R, s.wbc_count, s.domain_shift, D.shift_flag, sampleCounts(s, true));
  }

  function signoff(s) {
    return state.signoffs[s.sample_id] || s.signoff || null;
  }

  // A stored sign-off is outdated when a later run changed the sample's verified cells: it needs signing again.
  function isSigned(s) { const so = signoff(s); return !!so && so.status === D.signed_off && !so.outdated; }

  // ------------------------------------------------------------------ DOM helpers
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const ch of children.flat()) {
      if (ch === null || ch === undefined || ch === false) continue;
      el.append(ch instanceof Node ? ch : document.createTextNode(String(ch)));
    }
    return el;
  }

  let toastTimer = null;
  function toast(text) {
    const t = document.getElementById("toast");
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  function fmt(x, digits) { return isNaN(x) || x === null ? "–" : x.toFixed(digits); }
  // Keys 1-8 are the cell classes in class order, 0 is "unidentified".
  const KEYS = new Map(D.review_classes.map((cls, i) => [cls === UNID ? "0" : String(i + 1), cls]));
  function keyOf(cls) { for (const [k, c] of KEYS) if (c === cls) return k; return ""; }

  // ------------------------------------------------------------------ actions
  function requireReviewer() {
    if (state.reviewer.trim()) return true;
    const input = document.getElementById("reviewer");
    input.classList.add("missing");
    input.focus();
    toast("Enter your name as reviewer first: every decision and sign-off carries it.");
    return false;
  }

  function decide(c, cls) {
    const s = D.samples[c.sample];
    if (isSigned(s)) { toast("Sample " + s.sample_id + " is signed off: reopen it to change a cell."); return false; }
    if (cls !== null && !requireReviewer()) return false;
    if (cls === null) delete state.decisions[c.uri];
    else state.decisions[c.uri] = {cls: cls, reviewer: state.reviewer.trim(), at: now()};
    state.changes += 1;
    save();
    refreshCell(c);
    refreshSample();
    return true;
  }

  function setSignoff(s, status) {
    if (!requireReviewer()) return;
    state.signoffs[s.sample_id] = {status: D[status], reviewer: state.reviewer.trim(), at: now()};
    state.changes += 1;
    save();
    render();
  }

  function decisionsFile() {
    const reviews = [];
    for (const [uri, d] of Object.entries(state.decisions)) {
      const c = cellsByUri.get(uri);
      reviews.push({sample_id: D.samples[c.sample].sample_id, image_uri: uri, image_sha256: c.sha,
                    predicted_class: c.cls, verified_class: d.cls, reviewer: d.reviewer, reviewed_at: d.at});
    }
    const signoffs = Object.entries(state.signoffs).map(([sid, so]) => (
      {sample_id: sid, reviewer: so.reviewer, status: so.status, signed_at: so.at}));
    return {format: D.decisions_format, output_uri: D.output_uri, run_date: D.run_date, run_id: D.run_id,
            exported_at: now(), reviews: reviews, signoffs: signoffs};
  }

  function download() {
    const file = decisionsFile();
    if (!file.reviews.length && !file.signoffs.length) { toast("No decisions or sign-offs to download yet."); return; }
    const blob = new Blob([JSON.stringify(file, null, 1) + "\n"], {type: "application/json"});
    const a = h("a", {href: URL.createObjectURL(blob), download: D.decisions_file});
    document.body.append(a);
    a.click();
    a.remove();
    state.downloaded = {at: now(), changes: state.changes};
    save();
    renderProgress();
    toast("Saved " + D.decisions_file + ": import it with `bloodray review import " + D.decisions_file +
          " --output " + D.output_uri + " --date " + D.run_date + "`.");
  }

  // ------------------------------------------------------------------ rendering
  function renderProgress() {
    const n = Object.keys(state.decisions).length;
    const signed = D.samples.filter(isSigned).length;
    const unsaved = !state.downloaded || state.downloaded.changes !== state.changes;
    document.getElementById("progress").textContent =
      n + " decision(s) · " + signed + " of " + D.samples.length + " sample(s) signed off · " +
      (state.downloaded ? "downloaded " + state.downloaded.at.slice(11, 16) + " UTC" : "not downloaded") +
      (unsaved && state.changes ? " · unsaved changes" : "");
  }

  function cellNode(c) {
    const v = verdict(c);
    const kind = c.status === UNID ? "unidentified" : c.review ? "review" : "";
    const changed = v.cls !== c.cls || (c.status === UNID && v.source !== "machine");
    const cls = ["cell", kind, v.source === "page" ? "decided" : "", changed && v.source !== "machine" ? "changed" : "",
                 isSigned(D.samples[c.sample]) ? "locked" : "", selected === c.uri ? "selected" : ""];
    const img = c.thumb
      ? h("button", {class: "zoom", title: "enlarge", tabindex: "-1",
                     onclick: (ev) => { ev.stopPropagation(); select(c.uri); openOverlay(); }},
          h("img", {src: "data:image/jpeg;base64," + c.thumb, alt: c.name}))
      : h("div", {class: "noimg"}, "no thumbnail");
    let verdictText = null;
    if (v.source === "page") {
      verdictText = h("div", {class: "verdict" + (changed ? " changed" : "")},
                      changed ? "→ " + v.cls : "✓ " + v.cls + " confirmed");
    } else if (v.source === "imported") {
      verdictText = h("div", {class: "verdict prev"}, "reviewed: " + v.cls + " (" + v.reviewer + ")");
    }
    return h("div", {class: cls.filter(Boolean).join(" "), tabindex: "0", "data-uri": c.uri,
                     onclick: () => select(c.uri)},
      img,
      h("div", {class: "name", title: c.uri}, c.name),
      h("div", null, (c.status === UNID ? "model: " : "") + c.cls + (c.conf === null ? "" : " " + c.conf.toFixed(2))),
      h("div", null, kind ? h("span", {class: "badge " + kind}, kind === "review" ? "to review" : "unidentified") : null,
        c.ood === null ? null : h("span", {class: "badge ood"}, "OOD " + c.ood.toFixed(2))),
      verdictText);
  }

  function refreshCell(c) {
    const old = document.querySelector('.cell[data-uri="' + CSS.escape(c.uri) + '"]');
    if (old) old.replaceWith(cellNode(c));
    if (!document.getElementById("overlay").hidden && selected === c.uri) openOverlay();
  }

  // Cells of a sample in page order: unidentified first, then classes with cells to review first;
  // within a gallery, cells to review first, least confident first.
  function galleries(s) {
    const order = (a, b) => (b.review - a.review) || ((a.conf || 0) - (b.conf || 0)) || (a.uri < b.uri ? -1 : 1);
    const unid = s.cells.filter((c) => c.status === UNID).sort(order);
    const byClass = new Map();
    for (const c of s.cells) {
      if (c.status === UNID) continue;
      if (!byClass.has(c.cls)) byClass.set(c.cls, []);
      byClass.get(c.cls).push(c);
    }
    const groups = [...byClass.entries()].map(([cls, cells]) => [cls, cells.sort(order)]);
    const nReview = (cells) => cells.filter((c) => c.review).length;
    groups.sort((a, b) => (nReview(b[1]) - nReview(a[1])) || (b[1].length - a[1].length) || (a[0] < b[0] ? -1 : 1));
    return (unid.length ? [["unidentified", unid]] : []).concat(groups);
  }

  function orderedCells(s) { return galleries(s).flatMap(([, cells]) => cells); }

  function diffTable(s) {
    const live = liveDifferential(s);
    const counts = sampleCounts(s);
    const machine = s.machine ? s.machine.counts : null;
    const rows = [];
    const pctRow = (name, label, value, lo, hi, range) => {
      const m = machine ? machine[name] : null;
      return h("tr", null, h("td", null, label), h("td", {class: "n"}, m === null ? "–" : m),
        h("td", {class: "n" + (m !== null && m !== counts[name] ? " changed" : ""), "data-count": name}, counts[name]),
        h("td", {class: "n"}, fmt(value, 1)), h("td", {class: "n"}, fmt(lo, 1) + "–" + fmt(hi, 1)),
        h("td", {class: "n muted"}, range || ""));
    };
    for (const name of R.differential_classes) {
      const rng = R.ranges[name];
      rows.push(pctRow(name, name + " %", live["pct_" + name], live["pct_" + name + "_lo"], live["pct_" + name + "_hi"],
                       rng ? rng.low + "–" + rng.high : ""));
    }
    rows.push(pctRow("ig", "ig /100 WBC", live.ig_per_100_wbc, live.ig_per_100_wbc_lo, live.ig_per_100_wbc_hi,
                     "≤ " + R.ig_percent));
    rows.push(pctRow("erythroblast", "erythroblast /100 WBC", live.erythroblast_per_100_wbc,
                     live.erythroblast_per_100_wbc_lo, live.erythroblast_per_100_wbc_hi,
                     "≤ " + R.erythroblast_per_100_wbc));
    const m = machine ? machine.platelet : null;
    rows.push(h("tr", null, h("td", null, "platelet"), h("td", {class: "n"}, m === null ? "–" : m),
      h("td", {class: "n" + (m !== null && m !== counts.platelet ? " changed" : ""), "data-count": "platelet"},
        counts.platelet), h("td", {colspan: 3}, "")));
    rows.push(h("tr", null, h("th", null, "WBC counted"), h("td", {class: "n"}, machine ?
      R.wbc_classes.reduce((t, n) => t + machine[n], 0) : "–"), h("td", {class: "n", id: "n-wbc"}, live.n_wbc),
      h("td", {colspan: 3, class: "muted"}, "min " + R.min_wbc + (s.wbc_count === null ? "" :
        " · WBC " + s.wbc_count + " ×10⁹/L, flags on absolute counts"))));
    const table = h("table", {class: "diff"},
      h("tr", null, h("th", null, "class"), h("th", null, "machine"), h("th", null, "now"), h("th", null, "now %"),
        h("th", null, Math.round(R.confidence * 100) + " % interval"), h("th", null, "reference")), rows);
    const mFlags = s.machine ? s.machine.flags : [];
    const shown = (f) => (s.domain_shift && f !== D.shift_flag ? f + " (unverified: domain shift)" : f);
    const flagList = h("ul", {id: "live-flags"},
      live.flags.map((f) => h("li", {class: "flag" + (mFlags.includes(f) ? "" : " new")}, shown(f))),
      mFlags.filter((f) => !live.flags.includes(f)).map((f) => h("li", {class: "flag gone"}, shown(f))));
    return h("div", {class: "diffwrap"}, h("div", {class: "scroll"}, table),
      h("div", {class: "flags"}, h("b", null, "Flags now"), live.flags.length || mFlags.length ? flagList :
        h("p", {class: "muted", id: "live-flags"}, "none"),
        s.domain_shift ? h("p", {class: "alarm"}, "Domain-shift alarm: the flags are kept but unverified (images unlike the training data).") : null));
  }

  function signoffBar(s) {
    const so = signoff(s);
    const signed = isSigned(s);
    const open = s.cells.filter((c) => c.review && verdict(c).source === "machine").length;
    let text = "Not signed off";
    if (so && so.outdated) {
      text = "Signed off by " + so.reviewer + " at " + so.at + ", but a later run changed its cells: sign it off again";
    } else if (so) {
      text = (signed ? "Signed off by " : "Reopened by ") + so.reviewer + " at " + so.at;
    }
    return h("div", {class: "signoff"},
      h("span", {class: "state" + (signed ? " signed" : ""), id: "signoff-state"}, text),
      signed ? h("button", {id: "signoff", onclick: () => setSignoff(s, "reopened")}, "Reopen sample")
        : h("button", {id: "signoff", class: "primary", onclick: () => setSignoff(s, "signed_off")},
            "Sign off sample " + s.sample_id),
      !signed && open ? h("span", {class: "muted small"}, open + " cell(s) to review have no decision: signing off " +
                                                          "accepts their machine class") : null,
      s.n_reviews_unmatched ? h("span", {class: "alarm small"}, s.n_reviews_unmatched + " earlier review(s) of this " +
        "sample match no image of this run any more (changed or removed): see the reviews table") : null);
  }

  function refreshSample() {
    const s = D.samples[state.current];
    const old = document.getElementById("differential");
    if (old) old.replaceChildren(diffTable(s));
    const bar = document.getElementById("signoff-bar");
    if (bar) bar.replaceChildren(signoffBar(s));
    for (const el of document.querySelectorAll("h3[data-gallery]")) {
      const cells = s.cells.filter((c) => (c.status === UNID ? UNID : c.cls) === el.dataset.gallery);
      el.textContent = galleryTitle(el.dataset.gallery, cells);
    }
    renderSampleNav();
    renderProgress();
  }

  function galleryTitle(name, cells) {
    const review = cells.filter((c) => c.review).length;
    const changed = cells.filter((c) => verdict(c).cls !== c.cls).length;
    return (name === UNID ? "Unidentified" : name) + " (" + cells.length + (review ? ", " + review + " to review" : "") +
      (changed ? ", " + changed + " reclassified" : "") + ")";
  }

  function renderSampleNav() {
    const nav = document.getElementById("samples");
    nav.replaceChildren(...D.samples.map((s, i) => h("button", {
      class: [i === state.current ? "current" : "", isSigned(s) ? "signed" : "",
              liveDifferential(s).any_flag ? "flagged" : ""].filter(Boolean).join(" "),
      "data-sample": s.sample_id, title: s.cells.length + " cells", onclick: () => showSample(i)}, s.sample_id)));
  }

  function classButton(cls, c) {
    const v = c ? verdict(c).cls : null;
    return h("button", {class: "cls" + (v === cls ? " current" : ""), "data-class": cls,
                        onclick: (ev) => { ev.stopPropagation(); classify(cls); }},
      h("kbd", null, keyOf(cls)), cls);
  }

  function renderPalette() {
    const p = document.getElementById("palette");
    p.replaceChildren(h("span", {class: "muted"}, "Selected cell →"),
      ...D.review_classes.map((cls) => classButton(cls, null)),
      h("button", {onclick: () => confirmSelected()}, h("kbd", null, "Enter"), "confirm"),
      h("button", {onclick: () => undoSelected()}, h("kbd", null, "⌫"), "undo"),
      h("button", {onclick: () => { const el = document.getElementById("help"); el.hidden = !el.hidden; }},
        h("kbd", null, "?"), "keys"));
  }

  function render() {
    const s = D.samples[state.current];
    renderProgress();
    renderSampleNav();
    const main = document.getElementById("sample");
    if (!s) { main.replaceChildren(h("p", null, "This run has no classified cells.")); return; }
    main.replaceChildren(
      h("h2", null, "Sample " + s.sample_id, h("span", {class: "muted small"}, " · " + s.cells.length + " cells")),
      h("div", {id: "signoff-bar"}, signoffBar(s)),
      h("div", {id: "differential"}, diffTable(s)),
      ...galleries(s).map(([name, cells]) => [
        h("h3", {"data-gallery": name}, galleryTitle(name, cells)),
        h("div", {class: "gallery"}, cells.map(cellNode))]).flat());
  }

  function showSample(i) {
    if (i < 0 || i >= D.samples.length) return;
    state.current = i;
    selected = null;
    save();
    closeOverlay();
    render();
    window.scrollTo(0, 0);
  }

  // ------------------------------------------------------------------ selection, keys, overlay
  function select(uri) {
    const prev = selected;
    selected = uri;
    for (const u of [prev, uri]) {
      if (!u) continue;
      const el = document.querySelector('.cell[data-uri="' + CSS.escape(u) + '"]');
      if (el) el.classList.toggle("selected", u === selected);
    }
    const el = document.querySelector('.cell[data-uri="' + CSS.escape(uri) + '"]');
    if (el) { el.focus({preventScroll: true}); el.scrollIntoView({block: "nearest"}); }
  }

  function move(step) {
    const cells = orderedCells(D.samples[state.current]);
    if (!cells.length) return;
    let i = cells.findIndex((c) => c.uri === selected);
    i = i < 0 ? 0 : Math.min(Math.max(i + step, 0), cells.length - 1);
    select(cells[i].uri);
    if (!document.getElementById("overlay").hidden) openOverlay();
  }

  // Up/down: the cell below/above in the grid (the closest in x on the next row).
  function moveRow(dir) {
    const els = [...document.querySelectorAll("#sample .cell")];
    const cur = els.find((el) => el.dataset.uri === selected);
    if (!cur) { move(0); return; }
    const r = cur.getBoundingClientRect();
    const cands = els.filter((el) => { const b = el.getBoundingClientRect(); return dir > 0 ? b.top > r.bottom - 2 : b.bottom < r.top + 2; });
    if (!cands.length) return;
    const rowTop = dir > 0 ? Math.min(...cands.map((el) => el.getBoundingClientRect().top))
      : Math.max(...cands.map((el) => el.getBoundingClientRect().top));
    const row = cands.filter((el) => Math.abs(el.getBoundingClientRect().top - rowTop) < 4);
    row.sort((a, b) => Math.abs(a.getBoundingClientRect().left - r.left) - Math.abs(b.getBoundingClientRect().left - r.left));
    select(row[0].dataset.uri);
  }

  function selectedCell() {
    if (!selected) { toast("Select a cell first (click it, or use the arrow keys)."); return null; }
    return cellsByUri.get(selected);
  }

  function classify(cls) {
    const c = selectedCell();
    if (c && decide(c, cls)) move(1);
  }

  function confirmSelected() { const c = selectedCell(); if (c && decide(c, c.cls)) move(1); }
  function undoSelected() { const c = selectedCell(); if (c) decide(c, null); }

  function openOverlay() {
    const c = selectedCell();
    if (!c) return;
    const v = verdict(c);
    const o = document.getElementById("overlay");
    o.replaceChildren(h("div", {class: "box", onclick: (ev) => ev.stopPropagation()},
      c.thumb ? h("img", {src: "data:image/jpeg;base64," + c.thumb, alt: c.name}) : h("p", null, "no thumbnail"),
      h("div", {class: "name"}, h("b", null, c.name)),
      h("div", {class: "muted small"}, c.uri),
      h("div", null, "machine: " + c.cls + (c.conf === null ? "" : " (confidence " + c.conf.toFixed(3) + ")") +
        (c.status === UNID ? " · unidentified" : "") + (c.ood === null ? "" : " · OOD score " + c.ood.toFixed(2)) +
        (c.review ? " · to review" : "")),
      h("div", null, "now: ", h("b", null, v.cls), v.source === "machine" ? "" : " (" + v.source + ", " + v.reviewer + ")"),
      h("div", {class: "classes"}, D.review_classes.map((cls) => classButton(cls, c)),
        h("button", {onclick: () => move(-1)}, h("kbd", null, "←"), "previous"),
        h("button", {onclick: () => move(1)}, h("kbd", null, "→"), "next"),
        h("button", {onclick: closeOverlay}, h("kbd", null, "Esc"), "close"))));
    o.hidden = false;
  }

  function closeOverlay() { document.getElementById("overlay").hidden = true; }

  function onKey(ev) {
    if (ev.target instanceof HTMLInputElement || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key;
    const overlay = !document.getElementById("overlay").hidden;
    let done = true;
    if (KEYS.has(k)) classify(KEYS.get(k)); else if (k === "ArrowRight" || k === "l") move(1);
    else if (k === "ArrowLeft" || k === "h") move(-1);
    else if (k === "ArrowDown" || k === "j") (overlay ? move(1) : moveRow(1));
    else if (k === "ArrowUp" || k === "k") (overlay ? move(-1) : moveRow(-1));
    else if (k === "Enter" || k === "c") confirmSelected();
    else if (k === "Backspace" || k === "Delete" || k === "u") undoSelected();
    else if (k === " " || k === "z") (overlay ? closeOverlay() : openOverlay());
    else if (k === "Escape") closeOverlay();
    else if (k === "]") showSample(state.current + 1);
    else if (k === "[") showSample(state.current - 1);
    else if (k === "?") { const el = document.getElementById("help"); el.hidden = !el.hidden; }
    else done = false;
    if (done) ev.preventDefault();
  }

  // ------------------------------------------------------------------ page skeleton
  function build() {
    const app = document.getElementById("app");
    const reviewer = h("input", {id: "reviewer", placeholder: "your name", value: state.reviewer, autocomplete: "name"});
    reviewer.addEventListener("input", () => { state.reviewer = reviewer.value; reviewer.classList.remove("missing"); save(); });
    app.replaceChildren(
      h("div", {class: "top", id: "top"},
        h("h1", null, "Review " + D.run_date),
        h("span", {class: "muted small"}, "run " + D.run_id + " · " + D.output_uri),
        h("label", null, "Reviewer ", reviewer),
        h("span", {id: "progress", class: "small"}),
        h("button", {id: "download", class: "primary", onclick: download}, "Download decisions")),
      h("nav", {class: "samples", id: "samples"}),
      h("div", {class: "palette", id: "palette"}),
      h("div", {class: "help", id: "help", hidden: true},
        "Keys: ", h("kbd", null, "1"), "–", h("kbd", null, "8"), " reclassify as the class shown (", h("kbd", null, "0"),
        " unidentified) and go to the next cell; ", h("kbd", null, "Enter"), " confirm the machine's class; ",
        h("kbd", null, "⌫"), " undo; arrows move; ", h("kbd", null, "Space"), " enlarge; ", h("kbd", null, "["), " ",
        h("kbd", null, "]"), " previous/next sample. Decisions stay in this browser until you download them; ",
        "then run ", h("code", null, "bloodray review import " + D.decisions_file + " --output " + D.output_uri +
                        " --date " + D.run_date), "."),
      h("main", {id: "sample"}),
      h("div", {id: "overlay", hidden: true, onclick: closeOverlay}),
      h("div", {id: "toast", hidden: true, role: "status"}));
    renderPalette();
    render();
    const top = document.getElementById("top");
    document.documentElement.style.setProperty("--top", top.offsetHeight + "px");
    document.addEventListener("keydown", onKey);
    window.addEventListener("beforeunload", (ev) => {
      if (state.changes && (!state.downloaded || state.downloaded.changes !== state.changes)) ev.preventDefault();
    });
    if (restored && (restored[0] || restored[1])) {
      toast("Restored " + restored[0] + " decision(s) and " + restored[1] + " sign-off(s) kept in this browser.");
    }
  }

  // For tests and the curious: the data, the differential and the page's state.
  window.bloodrayReview = {data: D, differential: differential, liveDifferential: liveDifferential,
                           sampleCounts: sampleCounts, decisionsFile: decisionsFile, state: () => state};
  build();
})();
